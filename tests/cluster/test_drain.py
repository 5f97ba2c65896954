"""SIGTERM drains `tandem serve`: streams in flight finish with every token, new calls are refused (gRPC
UNAVAILABLE, HTTP 503) while they do, the process exits 0, and none of the processes it started (Ray's, the
replicas', the ranks', redis-server) outlives it. A real server in its own process, real clients over sockets."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LONG_TOKENS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until_serving(stub, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                                  sampling=pb.SamplingParams(max_tokens=1)), timeout=30))
            return
        except grpc.RpcError:
            assert time.monotonic() < deadline, "tandem serve did not come up"
            time.sleep(1)


def test_sigterm_finishes_streams_in_flight_refuses_new_calls_and_leaves_no_process(tiny_model_factory):
    http_port, grpc_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_model_factory("llama")),
         "--num-kv-blocks", "128", "--num-cpus-per-rank", "0.5", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{grpc_port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            wait_until_serving(stub)
            started = psutil.Process(server.pid).children(recursive=True)
            streamed: dict[str, object] = {}

            def grpc_stream():
                responses = list(stub.Generate(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                    sampling=pb.SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)), timeout=120))
                streamed["grpc"] = sum(len(r.token_ids) for r in responses)

            def http_stream():
                streamed["http"] = post(f"http://127.0.0.1:{http_port}/v1/completions",
                                        {"prompt": [9, 10, 11], "max_tokens": LONG_TOKENS, "ignore_eos": True})

            in_flight = [threading.Thread(target=grpc_stream), threading.Thread(target=http_stream)]
            for thread in in_flight:
                thread.start()
            time.sleep(1.0)
            server.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]),
                                                      sampling=pb.SamplingParams(max_tokens=2)), timeout=30))
            http_refused = post(f"http://127.0.0.1:{http_port}/v1/completions", {"prompt": [1, 2], "max_tokens": 2},
                                timeout=30)
            for thread in in_flight:
                thread.join(timeout=120)
        output, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert streamed["grpc"] == LONG_TOKENS
    status, body = streamed["http"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == LONG_TOKENS
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert http_refused[0] == 503, http_refused
    assert server.returncode == 0, output
    assert "draining" in output
    time.sleep(2)
    orphans = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert orphans == [], [(p.pid, p.name()) for p in orphans]
