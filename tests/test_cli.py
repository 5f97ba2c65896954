"""The `tandem` command line, run as a user runs it: a separate process, real model, stdout and exit codes."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from tests.hf_reference import hf_greedy

ROOT = Path(__file__).resolve().parents[1]


def tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_explains_every_command():
    out = tandem("--help")
    assert out.returncode == 0
    for command in ("generate", "chat", "bench"):
        assert command in out.stdout
    gen = tandem("generate", "--help")
    assert "--max-tokens" in gen.stdout and "--model" in gen.stdout and "smollm2" in gen.stdout


def test_generate_answers_with_the_embedded_model_as_json(smollm2_path):
    out = tandem("generate", "--chat", "--prompt", "What is the capital of France?", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["finish_reason"] == "stop"
    assert result["usage"]["generated_tokens"] == len(result["token_ids"]) > 0


def test_generate_streams_plain_text(smollm2_path):
    out = tandem("generate", "--prompt", "The capital of France is", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_min_tokens_keeps_a_short_answer_going(smollm2_path):
    out = tandem("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "40",
                 "--min-tokens", "40", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # the answer alone ends with EOS well before 40 tokens
    assert (result["finish_reason"], result["usage"]["generated_tokens"]) == ("length", 40)


def test_prompt_logprobs_come_in_the_json(smollm2_path):
    out = tandem("generate", "--prompt", "The capital of France is", "--max-tokens", "2", "--prompt-logprobs", "1",
                 "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    entries = result["prompt_logprobs"]
    assert len(entries) == result["usage"]["prompt_tokens"] and entries[0] is None
    assert all(1 <= len(entry) <= 2 for entry in entries[1:])  # the top one, and the prompt's token if it differs


def test_bad_flag_values_fail_with_a_message_naming_the_field():
    for flag, value, field in (("--temperature", "-1", "temperature"), ("--min-p", "2", "min_p")):
        out = tandem("generate", "--prompt", "hi", flag, value)
        assert out.returncode == 2
        assert field in out.stderr


def test_the_commands_a_client_runs_load_neither_torch_nor_transformers():
    """`generate --url` and `chat --url` only speak gRPC, and bad flags fail before a model loads: they start in
    about a second instead of the four that importing the ML stack takes."""
    code = ("import sys, cluster.cli; from cluster.commands import chat, generate; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_model_fails_clearly(tmp_path):
    out = tandem("generate", "--prompt", "hi", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "not found" in out.stderr and "smollm2" in out.stderr


@pytest.mark.slow
def test_generate_on_disaggregated_tensor_parallel_groups_gives_hfs_tokens(tiny_model_factory):
    """-tp 2 --disaggregate: a local Ray, a prefill and a decode group of two ranks each, the KV moved between."""
    model = tiny_model_factory("llama")
    prompt = "The quick brown fox jumps over the lazy dog"
    out = tandem("generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "8", "--ignore-eos",
                 "--json", "--tensor-parallel-size", "2", "--disaggregate")
    assert out.returncode == 0, out.stderr
    prompt_ids = AutoTokenizer.from_pretrained(model).encode(prompt)
    assert json.loads(out.stdout)["token_ids"] == hf_greedy(model, prompt_ids, 8)


@pytest.mark.slow
def test_serve_answers_over_grpc_and_http_and_stops_cleanly_on_ctrl_c(tiny_model_factory, tmp_path):
    """The README's main command: a local Ray and redis-server, the app, requests answered, Ctrl-C."""
    http_port, grpc_port, model = _free_port(), _free_port(), str(tiny_model_factory("llama"))
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", model, "--num-kv-blocks", "64",
                               "--num-cpus-per-rank", "0.5", "--http-port", str(http_port), "--grpc-port",
                               str(grpc_port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer = _post_until_answered(f"http://127.0.0.1:{http_port}/v1/completions",
                                      {"prompt": [1, 2, 3, 4], "max_tokens": 4, "ignore_eos": True})
        refused = _post(f"http://127.0.0.1:{http_port}/v1/completions", {"prompt": "", "max_tokens": 4})
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            models = tandem_pb2_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=120)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
    assert refused[0] == 400 and refused[1]["error"]["param"] == "prompt"
    assert [m.id for m in models.models] == [Path(model).name]
    assert server.returncode == 0, output
    assert f"serving gRPC on 0.0.0.0:{grpc_port}" in output and "shutting down" in output
    assert "tandem: replicas: prefill: 1 running; decode: 1 running; ingress: 1 running" in output
    assert "failed" not in output, output  # a clean stop reports no failed task, Serve's or Ray's
    assert not [line for line in output.splitlines() if line.startswith("INFO ")], output  # Serve's, without -v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _post_until_answered(url: str, body: dict, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, answer = _post(url, body)
            assert status == 200, answer
            return answer
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):  # not up yet, or Serve's own 404/503
            assert time.monotonic() < deadline, "tandem serve did not answer"
            time.sleep(1)
