"""A draining ingress (Serve is stopping its replica) refuses new gRPC calls with UNAVAILABLE, so clients retry on
another replica, and fails its own health check. A real gRPC server on a socket, an ingress without pools (the
calls here never reach one)."""

import asyncio
import gc
import socket

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.grpc_api import start_grpc_server
from router.ingress import Ingress, ServedModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore:coroutine .Ingress.__del__. was never awaited")
def test_a_draining_server_refuses_new_calls_as_unavailable(tiny_model_factory):
    path = str(tiny_model_factory("llama"))
    ingress = Ingress(None, None, ServedModel("tiny", path, max_model_len=1024, vocab_size=49152, block_size=16,
                    hidden_size=64))
    port = free_port()

    async def run(ingress: Ingress):
        server = await start_grpc_server(ingress, "127.0.0.1", port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            before = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            server.check_health()
            await server.drain(grace_s=1)
            with pytest.raises(RuntimeError, match="draining"):
                server.check_health()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        return before, refused.value.code()

    before, code = asyncio.run(run(ingress))
    del ingress
    gc.collect()  # here, under this test's filter: outside Serve nothing awaits the ingress's async __del__
    assert [m.id for m in before.models] == ["tiny"]
    assert code == grpc.StatusCode.UNAVAILABLE
