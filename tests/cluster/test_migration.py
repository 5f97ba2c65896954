"""A group that fails its requests costs their callers nothing. A decode group lost mid-stream: the ingress moves
each of its requests to the other decode group, which carries on from the tokens already streamed (the prefill pool
computes them again with the prompt), and every caller receives one whole stream with exactly the tokens the
request would have had (greedy, and seeded sampling too). A prefill group that fails: its requests are prefilled by
the other prefill group, not by the decode groups. A real Serve app (two prefill and two decode replicas, one rank
each), a real redis-server, gRPC streams over a socket, and SIGKILL of the busier decode group's rank while they
run; then SIGSTOP of it, a rank that hangs."""

import asyncio
import os
import random
import signal
import time
import urllib.request

import grpc
import pytest
import ray
import torch
from ray import serve

from cluster.app import build_app
from cluster.bench import faults
from cluster.config import ClusterConfig, PoolConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.routing_hint import OUT_OF_SERVICE
from tests.conftest import SERVE_HTTP_URL
from tests.hf_reference import hf_embedding
from tests.workers.test_faults import fail_next_step
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP, PORT = "tandem-migration", 16111
STREAMS, MAX_TOKENS = 8, 160
STEP_TIMEOUT_S = 15.0  # above kv_transfer_timeout_s; the tiny model's steps take milliseconds, also in a loaded CI
LATE_S = 7.0  # a request sent this long after a rank is signalled: past the 5 s a hung rank 0 has to answer its load


def params(i: int) -> SamplingParams:
    """Streams 0, 1, 4, 5 greedy, 2, 3, 6, 7 sampled under a seed of their own: whichever way the two decode groups
    share them, each has some of both kinds."""
    if i // 2 % 2 == 0:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=50, seed=100 + i, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[rng.randrange(49152) for _ in range(rng.randint(20, 60))] for _ in range(STREAMS)]


@pytest.fixture(scope="module")
def expected(model, prompts) -> list[list[int]]:
    llm = LLM(model, num_kv_blocks=256, progress=False)
    return [llm.generate(p, params(i))[0].outputs[0].token_ids for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def cluster(model, redis_url):
    config = ClusterConfig(model=model, num_kv_blocks=256, num_cpus_per_rank=0.5, redis_url=redis_url,
                           grpc_port=PORT, kv_transfer_timeout_s=10, step_timeout_s=STEP_TIMEOUT_S,
                           prefill=PoolConfig(replicas=2),
                           decode=PoolConfig(replicas=2))
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield
    serve.delete(APP)


def migrations() -> float:
    with urllib.request.urlopen(f"{SERVE_HTTP_URL}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return float(next(line for line in lines if line.startswith("tandem_request_migrations_total ")).split()[1])


async def stream(stub, prompt: list[int], i: int, received: list[int]) -> str:
    p = params(i)
    sampling = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                 ignore_eos=True, **({"seed": p.seed} if p.seed is not None else {}))
    try:
        async for response in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling),
                                            timeout=120):
            received.extend(response.token_ids)
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()}"
    return "OK"


async def signal_the_busier_decode_group_mid_stream(prompts, sig: signal.Signals = signal.SIGKILL, late: bool = False
                                                    ) -> tuple[list[str], list[list[int]], int, tuple | None]:
    """The streams' statuses and tokens, how many were on the signalled group, and with `late` a request sent
    LATE_S after the signal (its status, tokens and when it ended) and when the group said it was out of service,
    both in seconds after the signal."""
    received: list[list[int]] = [[] for _ in prompts]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        running = [asyncio.create_task(stream(stub, p, i, received[i])) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 60
        while min(map(len, received)) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        victim = next(r for r in await asyncio.to_thread(faults.rank_processes) if r.pool == "decode")  # busiest
        os.kill(victim.pid, sig)
        signalled = time.monotonic()
        at_kill = [len(r) for r in received]
        late_task = asyncio.gather(late_request(stub, prompts[0], signalled),
                                   asyncio.to_thread(out_of_service_after, victim.group, signalled)) if late else None
        statuses = await asyncio.gather(*running)
        late_result = tuple(await late_task) if late_task else None
    assert max(at_kill) < MAX_TOKENS, "the streams ended before the kill: nothing was lost mid-stream"
    return statuses, received, victim.num_running, late_result


def out_of_service_after(group: str, signalled: float) -> float:
    """Seconds after the signal until the group's replica tells the request routers it is out of service (what
    Serve polls from it every second)."""
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith("SERVE_REPLICA") and a["name"].endswith(f"{APP}#decode#{group}")]
    replica = ray.get_actor(name, namespace="serve")
    while OUT_OF_SERVICE not in ray.get(replica.record_routing_stats.remote()):
        time.sleep(0.2)
    return time.monotonic() - signalled


async def late_request(stub, prompt: list[int], signalled: float) -> tuple[str, list[int], float]:
    await asyncio.sleep(signalled + LATE_S - time.monotonic())
    received: list[int] = []
    status = await stream(stub, prompt, 0, received)
    return status, received, time.monotonic() - signalled


def pool_stats(pool: str) -> dict:
    return {name: s for name, s in asyncio.run(faults.idle_stats()).items() if name.startswith(f"{pool} ")}


def test_requests_whose_prefill_group_failed_are_prefilled_by_the_other_one(cluster, prompts, expected):
    """A forward pass that raises cannot be caused from outside on a healthy model: one prefill group's
    next step is made to raise in its own process (tests/workers/test_faults.py), the only fake here."""
    computed_by_decode = sum(s.num_computed_prompt_tokens for s in pool_stats("decode").values())
    victim = next(a for a in faults.rank_actors() if a.pool == "prefill" and a.rank == 0)
    ray.get(victim.handle.__ray_call__.remote(fail_next_step))

    async def run_all() -> tuple[list[str], list[list[int]]]:
        received: list[list[int]] = [[] for _ in prompts]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{PORT}") as channel:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            statuses = await asyncio.gather(*(stream(stub, p, i, received[i]) for i, p in enumerate(prompts)))
        return statuses, received

    statuses, received = asyncio.run(run_all())
    assert ray.get(victim.handle.__ray_call__.remote(lambda worker: getattr(worker, "failed_step", []))), \
        "no request reached the failing prefill group"
    assert statuses == ["OK"] * STREAMS
    assert received == expected
    assert sum(s.num_computed_prompt_tokens for s in pool_stats("decode").values()) == computed_by_decode


def test_embeddings_whose_group_failed_are_computed_by_another_group(cluster, model):
    """An embedding is computed afresh wherever it goes. Both prefill groups and one decode group fail their next
    step (the same injected failure): the embeddings in those steps move to the decode pool, and those that meet
    the failing decode group to the other one; each comes back the vector HF gives, none as an error."""
    rng = random.Random(9)
    prompts = [[rng.randrange(49152) for _ in range(rng.randint(20, 60))] for _ in range(STREAMS)]
    drivers = [a for a in faults.rank_actors() if a.rank == 0]
    victims = [a for a in drivers if a.pool == "prefill"] + [next(a for a in drivers if a.pool == "decode")]
    for victim in victims:
        ray.get(victim.handle.__ray_call__.remote(fail_next_step))

    async def embed_all() -> list[pb.EmbedResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{PORT}") as channel:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            return await asyncio.gather(*(stub.Embed(pb.EmbedRequest(token_ids=pb.TokenIds(ids=p),
                                                                     request_id=f"embed-{i}"), timeout=120)
                                          for i, p in enumerate(prompts)))

    before = migrations()
    embedded = asyncio.run(embed_all())
    for victim in victims:
        failed = ray.get(victim.handle.__ray_call__.remote(lambda worker: getattr(worker, "failed_step", [])))
        assert any(request_id.startswith("embed-") for request_id in failed), f"no embedding failed on {victim}"
    assert migrations() > before  # from one decode group to the other
    for prompt, response in zip(prompts, embedded):
        torch.testing.assert_close(torch.tensor(response.embedding), hf_embedding(model, prompt), atol=2e-5, rtol=0)


def test_the_streams_of_a_killed_decode_group_carry_on_elsewhere_with_their_exact_tokens(cluster, prompts,
                                                                                         expected):
    before, prefilled = migrations(), sum(s.num_finished for s in pool_stats("prefill").values())
    statuses, received, moved, _ = asyncio.run(signal_the_busier_decode_group_mid_stream(prompts))
    assert statuses == ["OK"] * STREAMS
    assert received == expected
    assert moved > 0
    moves = migrations() - before
    assert moves >= moved  # a move that lands on the lost group before the routers know moves again
    stats = asyncio.run(faults.idle_stats())
    assert not faults.leaks(stats)
    # For each move, the request's prompt and streamed tokens were computed again by the prefill pool, as a new
    # request's prompt is, not by the decode group it moved to.
    assert sum(s.num_finished for s in pool_stats("prefill").values()) - prefilled == STREAMS + moves


def test_the_streams_of_a_hung_decode_group_carry_on_elsewhere_once_it_times_out(cluster, prompts, expected):
    """SIGSTOP: the rank neither answers nor dies, as under a stuck kernel or collective. Its replica ends the group
    once no step has ended for step_timeout_s, and the streams move as from a killed group; before, they waited
    for Serve's health check to fail three times and the replica's graceful shutdown (170 s). Meanwhile the group
    says it is out of service once rank 0 has not answered its load for 5 s, so a request sent after that goes to
    the other group and is not held up."""
    deadline = time.monotonic() + 120
    while len(faults.serving_groups("decode")) < 2:  # the group the kill above took is replaced
        assert time.monotonic() < deadline, "the decode pool did not get its second group back"
        time.sleep(0.5)
    started = time.monotonic()
    statuses, received, moved, ((late_status, late_tokens, late_end_s), out_of_service_s) = asyncio.run(
        signal_the_busier_decode_group_mid_stream(prompts, signal.SIGSTOP, late=True))
    took = time.monotonic() - started
    print(f"{moved} streams on the hung group; all {STREAMS} complete {took:.1f} s after they started "
          f"(step_timeout_s {STEP_TIMEOUT_S:.0f}); the group said it was out of service {out_of_service_s:.1f} s "
          f"after the stop; a request sent {LATE_S:.0f} s after it ended {late_end_s:.1f} s after it")
    assert statuses == ["OK"] * STREAMS
    assert received == expected
    assert moved > 0
    assert took < STEP_TIMEOUT_S + 40, f"the streams took {took:.0f} s"
    assert out_of_service_s < LATE_S
    assert (late_status, late_tokens) == ("OK", expected[0])
    assert late_end_s < STEP_TIMEOUT_S
