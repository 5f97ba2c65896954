"""`tandem serve`, the README's main command, from start to stop: it reports its replicas coming up, answers over
gRPC and HTTP, and Ctrl-C or SIGTERM drains it: streams in flight finish with every token, new calls are refused
(gRPC UNAVAILABLE, HTTP 503) while they do, the process exits 0 and quietly, and none of the processes it started
(Ray's, the replicas', the ranks', redis-server) outlives it. While it works, its console says what each pool
does. A real server in its own process, real clients over sockets."""

import json
import re
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
LONG_TOKENS = 500  # streams that last well past the SIGTERM


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


def test_serve_answers_then_ctrl_c_drains_it_and_a_sigterm_meanwhile_changes_nothing(tiny_model_factory):
    """One server for the whole life: starting one takes half a minute. Ctrl-C starts the drain and Kubernetes'
    SIGTERM arrives during it, so both signals are checked to reach the drain rather than Python's or Ray's
    default handlers, which would end the process before the streams finish."""
    http_port, grpc_port, model = free_port(), free_port(), tiny_model_factory("llama")
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model), "--num-kv-blocks", "128",
         "--num-cpus-per-rank", "0.5", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--log-stats-interval", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    completions = f"http://127.0.0.1:{http_port}/v1/completions"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = tandem_pb2_grpc.GenerationStub(channel)
            wait_until_serving(stub)
            started = psutil.Process(server.pid).children(recursive=True)
            answered = post(completions, {"prompt": [1, 2, 3, 4], "max_tokens": 4, "ignore_eos": True})
            bad_prompt = post(completions, {"prompt": "", "max_tokens": 4})
            models = stub.ListModels(pb.ListModelsRequest(), timeout=30)
            streamed: dict[str, object] = {}

            def grpc_stream():
                responses = list(stub.Generate(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                    sampling=pb.SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)), timeout=120))
                streamed["grpc"] = sum(len(r.token_ids) for r in responses)

            def http_stream():
                streamed["http"] = post(completions, {"prompt": [9, 10, 11], "max_tokens": LONG_TOKENS,
                                                      "ignore_eos": True})

            in_flight = [threading.Thread(target=grpc_stream), threading.Thread(target=http_stream)]
            for thread in in_flight:
                thread.start()
            time.sleep(1.0)
            server.send_signal(signal.SIGINT)
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]),
                                                      sampling=pb.SamplingParams(max_tokens=2)), timeout=30))
            http_refused = post(completions, {"prompt": [1, 2], "max_tokens": 2}, timeout=30)
            server.send_signal(signal.SIGTERM)
            still_draining = all(thread.is_alive() for thread in in_flight)
            for thread in in_flight:
                thread.join(timeout=120)
        output, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    status, body = answered
    assert status == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
    status, body = bad_prompt
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
    assert [m.id for m in models.models] == [model.name]
    assert still_draining  # the SIGTERM came while the streams were running
    assert streamed["grpc"] == LONG_TOKENS
    status, body = streamed["http"]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == LONG_TOKENS
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert http_refused[0] == 503, http_refused
    assert server.returncode == 0, output
    assert f"serving gRPC on 0.0.0.0:{grpc_port}" in output
    assert "tandem: replicas: prefill: 1 running; decode: 1 running; ingress: 1 running" in output
    assert "draining" in output and "shutting down" in output
    # While it works, the console says what each pool does, as vLLM's stats lines.
    generating = [float(m) for m in re.findall(r"tandem: decode pool, 1 group:.* generation ([0-9.]+) tok/s", output)]
    assert generating and max(generating) > 0, output
    assert "tandem: prefill pool, 1 group: prompt" in output
    assert "failed" not in output, output  # a clean stop reports no failed task, Serve's or Ray's
    assert not [line for line in output.splitlines() if line.startswith("INFO ")], output  # Serve's, without -v
    time.sleep(2)
    orphans = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert orphans == [], [(p.pid, p.name()) for p in orphans]
