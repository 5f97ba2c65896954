"""The `tandem` command line, run as a user runs it: a separate process, real model, stdout and exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

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


def test_bad_flag_values_fail_with_a_message_naming_the_field():
    out = tandem("generate", "--prompt", "hi", "--temperature", "-1")
    assert out.returncode == 2
    assert "temperature" in out.stderr


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
