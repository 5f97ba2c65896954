"""A request whose caller is gone stops: when an ingress replica dies while it streams (SIGKILL), the decode group
aborts the requests it was streaming within seconds, instead of decoding them to max_tokens for nobody, and every
block is free again; Serve replaces the ingress and new requests are served. A real Serve app on the embedded
model (slow enough per token that the streams would outlast the test by minutes), gRPC over a socket."""

import asyncio
import os
import signal
import time

import grpc
import pytest
import ray
from ray import serve

from cluster.app import build_app
from cluster.bench import faults
from cluster.config import ClusterConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP, PORT = "tandem-caller-loss", 16141
STREAMS, MAX_TOKENS = 6, 4000


@pytest.fixture(scope="module")
def cluster(smollm2_path, redis_url):
    config = ClusterConfig(model=str(smollm2_path), num_kv_blocks=512, num_cpus_per_rank=0.5, redis_url=redis_url,
                           grpc_port=PORT)
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield
    serve.delete(APP)


def ingress_pid() -> int:
    (name, namespace), = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                          if f"{APP}#ingress#" in a["name"]]
    return ray.get(ray.get_actor(name, namespace=namespace).__ray_call__.remote(lambda _: os.getpid()))


async def stream_until_cut(stub, i: int, started: asyncio.Event, count: list[int]) -> str:
    request = pb.GenerateRequest(text=f"Story {i}: once upon a time", sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    try:
        async for _ in stub.Generate(request, timeout=120):
            count[0] += 1
            if count[0] >= STREAMS * 2:
                started.set()
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


async def kill_the_ingress_under_streams() -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        started, count = asyncio.Event(), [0]
        streams = [asyncio.create_task(stream_until_cut(stub, i, started, count)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(await asyncio.to_thread(ingress_pid), signal.SIGKILL)
        return await asyncio.gather(*streams)


def test_the_requests_of_a_dead_ingress_are_aborted_and_their_blocks_freed(cluster):
    assert set(asyncio.run(kill_the_ingress_under_streams())) == {"UNAVAILABLE"}
    killed = time.monotonic()
    stats = asyncio.run(faults.idle_stats(timeout_s=30))
    assert faults.leaks(stats) == [], f"{time.monotonic() - killed:.0f} s after the kill"

    deadline = time.monotonic() + 90
    while True:  # Serve replaces the ingress replica, which serves the gRPC API again
        try:
            with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
                request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))
                assert len([r for r in tandem_pb2_grpc.GenerationStub(channel).Generate(request, timeout=10)]) > 0
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "no ingress served again within 90 s"
            time.sleep(1.0)
