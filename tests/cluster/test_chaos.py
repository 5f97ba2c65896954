"""The cluster keeps its promises under cancel storms and killed ranks: streams that are not cancelled return
exactly their greedy tokens, cancelled ones free everything, and the streams of a group with a killed rank
complete elsewhere with their exact tokens while Serve replaces the group. A real Serve app with tensor-parallel
groups of 2 ranks (a prefill group and two decode groups), a real redis-server, gRPC clients over a socket, and
SIGKILL for the kills. `tandem bench chaos` runs the same code (cluster/bench/faults.py) for 20 rounds."""

import asyncio
import random

import pytest
from ray import serve

from cluster.app import build_app
from cluster.bench import faults
from cluster.config import ClusterConfig, PoolConfig
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP = "tandem-chaos"
PORT = 16091
TARGET = f"127.0.0.1:{PORT}"
LONG_TOKENS, SHORT_TOKENS = 32, 6


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return faults.prompt_set(random.Random(5), 49152)


@pytest.fixture(scope="module")
def expected(model, prompts) -> list[list[int]]:
    greedy = SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in LLM(model, num_kv_blocks=256, progress=False).generate(prompts, greedy)]


@pytest.fixture(scope="module")
def cluster(model, redis_url):
    config = ClusterConfig(model=model, tensor_parallel_size=2, num_kv_blocks=256, num_cpus_per_rank=0.25,
                           redis_url=redis_url, grpc_port=PORT, kv_transfer_timeout_s=10,
                           prefill=PoolConfig(max_ongoing_requests=256),
                           decode=PoolConfig(replicas=2, max_ongoing_requests=256))
    serve.run(build_app(config), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


def test_a_cancel_storm_at_every_phase_returns_exact_tokens_and_leaks_nothing(cluster, prompts, expected):
    rng = random.Random(6)
    for round_ in range(3):
        plan = faults.plan_round(rng, len(prompts), streams=100, long_streams=10, short_tokens=SHORT_TOKENS,
                                long_tokens=LONG_TOKENS, first_token_s=0.5)
        outcomes = asyncio.run(faults.storm_round(TARGET, prompts, plan))
        assert faults.wrong_outputs(outcomes, expected) == [], f"round {round_}"
        cancelled = [o for o in outcomes if o.stream.how not in ("finish", "after_last_token")]
        assert {o.status for o in cancelled} <= {"CANCELLED", "OK"}, f"round {round_}"
        assert faults.leaks(asyncio.run(faults.idle_stats())) == [], f"round {round_}"
    assert {o.stream.how for o in outcomes} == set(faults.HOW)


@pytest.mark.parametrize("pool, rank", [("decode", 1), ("prefill", 0)],
                         ids=["a decode follower rank", "a prefill group's rank 0"])
def test_the_streams_of_a_group_with_a_killed_rank_complete_and_serve_replaces_the_group(cluster, prompts,
                                                                                        expected, pool, rank):
    """Every stream in flight completes with its exact tokens within the health-check period + 10 s: a lost
    prefill group's requests are prefilled by a decode group, a lost decode group's move to the other one and
    carry on; new requests are served meanwhile, and nothing stays held once Serve has replaced the group."""
    result = asyncio.run(faults.kill_under_load(TARGET, pool, rank, prompts, expected, streams=12,
                                               max_tokens=LONG_TOKENS))
    assert result.other == []
    assert result.completed == result.in_flight == 12
    assert result.slowest_end_s < faults.HEALTH_CHECK_PERIOD_S + 10
    assert result.recovered_s < faults.HEALTH_CHECK_PERIOD_S + 10
    assert result.replaced_s < 120
    assert faults.leaks(asyncio.run(faults.idle_stats(timeout_s=60))) == []
