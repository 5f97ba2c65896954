"""Redis holds what makes routing better (the KV-block index, the groups' load reports), never what serving needs:
while the cluster's Redis hangs or is down, every request is served with exactly its tokens (the pools' request
routers choose the groups by the loads Serve reports), and once a Redis is back on that address, empty as after a
restart, the groups publish their loads and whole caches to it again and the ingress reads them from it. A real
Serve app, a redis-server of the test's own that it freezes (SIGSTOP), kills and starts again on the same port,
and gRPC over a socket."""

import os
import random
import signal
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig
from cluster.redis_server import LocalRedis
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from tests.conftest import SERVE_HTTP_URL
from tests.hf_reference import hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP, PORT = "tandem-redis-outage", 16131
MAX_TOKENS = 8
DEADLINE_S = 30  # a request that waits on a Redis that hangs fails the test instead of hanging it


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def redis_server():
    server = LocalRedis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(model, redis_server):
    config = ClusterConfig(model=model, num_kv_blocks=128, num_cpus_per_rank=0.5, redis_url=redis_server.url,
                           grpc_port=PORT)
    serve.run(build_app(config), name=APP, route_prefix="/")
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        yield tandem_pb2_grpc.GenerationStub(channel)
    serve.delete(APP)


def served(stub, model: str, rng: random.Random) -> None:
    """One new 40-token prompt through the cluster; its tokens must be HF's."""
    prompt = [rng.randrange(49152) for _ in range(40)]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    tokens = [t for r in stub.Generate(request, timeout=DEADLINE_S) for t in r.token_ids]
    assert tokens == hf_greedy(model, prompt, MAX_TOKENS)


def metrics() -> dict[str, float]:
    with urllib.request.urlopen(f"{SERVE_HTTP_URL}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("tandem_")}


def wait_until(shown: Callable[[dict[str, float]], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if shown(metrics()):
            return
        time.sleep(0.5)
    raise AssertionError(f"the ingress showed no {what} within {timeout_s} s")


def load_reports(shown: dict[str, float]) -> bool:
    return len([name for name in shown if name.startswith("tandem_group_running_seqs{")]) == 2


def indexed_blocks(shown: dict[str, float]) -> bool:
    return shown.get("tandem_router_index_blocks", 0) > 0


def test_requests_are_served_while_redis_hangs_or_is_down_and_its_state_returns_with_it(stub, model,
                                                                                       redis_server):
    rng = random.Random(5)
    served(stub, model, rng)
    wait_until(load_reports, "load reports")
    wait_until(indexed_blocks, "KV index")

    indexed_before = metrics()["tandem_router_index_blocks"]
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            served(stub, model, rng)
            time.sleep(1.0)  # past the load reports' one-second cache, so each request's routing reads Redis
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)

    port = redis_server.port
    redis_server.stop()
    for _ in range(3):
        served(stub, model, rng)
        time.sleep(1.0)

    restarted = LocalRedis(port=port)  # empty, as a Redis without persistence is after a restart
    try:
        wait_until(load_reports, "load reports")
        # The groups publish their whole caches again: the index holds at least what it held before the outage
        # (nothing was evicted since), with no new request to show it.
        wait_until(lambda shown: shown.get("tandem_router_index_blocks", 0) >= indexed_before,
                   f"KV index of {indexed_before} blocks or more")
        served(stub, model, rng)
    finally:
        restarted.stop()
