"""Autoscaling end to end on a local Ray: the cluster deployed from its Serve config (as `tandem serve` and the
Helm chart deploy it) with the pools' policy (cluster/autoscaling.py) and short delays. A burst of long prompts
grows the decode pool (unified mode: it prefills too) from one group to two while every request succeeds; when
the load stops it shrinks back to one, and the requests it served are not lost."""

import asyncio
import time

import pytest
from ray import serve
from ray.serve.schema import ReplicaState

from cluster.autoscaling import AutoscalingTargets
from cluster.config import ClusterConfig, PoolConfig
from cluster.deploy import deploy
from cluster.serve_config import APP_NAME
from router.ingress import GenerateRequest
from workers.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def running_replicas(deployment: str) -> int:
    states = serve.status().applications[APP_NAME].deployments[deployment].replica_states
    return states.get(ReplicaState.RUNNING, 0)


def wait_until(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(tiny_model_factory, redis_url):
    config = ClusterConfig(
        model=str(tiny_model_factory("llama")), disaggregate=False, num_kv_blocks=256, num_cpus_per_rank=0.5,
        max_num_batched_tokens=128, redis_url=redis_url, grpc_port=16081,
        decode=PoolConfig(replicas=1, min_replicas=1, max_replicas=2),
        autoscaling=AutoscalingTargets(prefill_backlog_s=0.05, decode_kv_usage=0.5, downscale_delay_s=5.0,
                                       metrics_interval_s=0.5, look_back_s=2.0))
    deploy(config, timeout_s=300)
    yield serve.get_app_handle(APP_NAME)
    serve.delete(APP_NAME)


def test_a_burst_grows_the_pool_and_the_pool_shrinks_back_when_it_ends(cluster):
    assert running_replicas("decode") == 1
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    prompts = [[(17 * i + 3 * j) % 49152 for j in range(400)] for i in range(96)]

    async def one(prompt: list[int]):
        outs = [o async for o in cluster.options(stream=True).generate.remote(
            GenerateRequest(prompt_token_ids=prompt, params=params))]
        return outs[-1]

    async def burst():
        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        await asyncio.to_thread(wait_until, lambda: running_replicas("decode") == 2, 120)
        return await asyncio.gather(*tasks)

    finals = asyncio.run(burst())
    assert all(out.finished and len(out.outputs[0].token_ids) == 48 for out in finals)
    wait_until(lambda: running_replicas("decode") == 1, 120)  # once the downscale delay has passed
    later = asyncio.run(one(prompts[0]))
    assert later.outputs[0].token_ids == finals[0].outputs[0].token_ids
