"""The `tandem` command line, run as a user runs it: a separate process, real model, stdout and exit codes."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import with_generation_config
from tests.hf_reference import hf_greedy
from tests.lora_adapters import ATTENTION, MLP, merged_model, write_adapter

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
    assert tandem("--version").stdout == f"tandem {version('tandem')}\n"


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


def test_min_tokens_keeps_a_short_answer_going_and_prompt_logprobs_come_in_the_json(smollm2_path):
    out = tandem("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "40",
                 "--min-tokens", "40", "--prompt-logprobs", "1", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # the answer alone ends with EOS well before 40 tokens
    assert (result["finish_reason"], result["usage"]["generated_tokens"]) == ("length", 40)
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


def test_generate_through_a_lora_adapter_gives_the_tokens_of_its_merged_weights(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    adapter = write_adapter(tmp_path / "sql", model, ATTENTION + MLP, rank=4, alpha=8, seed=3, std=0.2)
    prompt = "The quick brown fox jumps over the lazy dog"
    out = tandem("generate", "--model", str(model), "--lora", str(adapter.folder), "--prompt", prompt,
                 "--max-tokens", "8", "--ignore-eos", "--json", "--num-kv-blocks", "64")
    assert out.returncode == 0, out.stderr
    prompt_ids = AutoTokenizer.from_pretrained(model).encode(prompt)
    tokens = json.loads(out.stdout)["token_ids"]
    assert tokens == hf_greedy(merged_model(adapter, model, tmp_path / "merged"), prompt_ids, 8)
    assert tokens != hf_greedy(model, prompt_ids, 8)  # else the adapter could have been left out unnoticed


def test_a_lora_adapter_that_is_not_there_fails_clearly_before_the_model_loads(tmp_path):
    out = tandem("generate", "--lora", str(tmp_path / "sql"), "--prompt", "hi")
    assert out.returncode == 2
    assert "tandem: error: LoRA adapter 'sql': cannot read" in out.stderr and "Traceback" not in out.stderr
    out = tandem("generate", "--url", "localhost:1", "--lora", str(tmp_path / "sql"), "--prompt", "hi")
    assert out.returncode == 2  # a cluster's adapters are loaded there, and named with --model
    assert "--model NAME" in out.stderr


def test_serve_refuses_adapter_folders_that_are_not_there_before_starting_anything(tmp_path):
    out = tandem("serve", "--lora-modules", f"sql={tmp_path / 'sql'}")
    assert out.returncode == 2
    assert "tandem: error: LoRA adapter 'sql': cannot read" in out.stderr and "starting" not in out.stderr
    out = tandem("serve", "--lora-dir", str(tmp_path / "adapters"))
    assert out.returncode == 2
    assert f"tandem: error: lora_dir {tmp_path / 'adapters'} is not a folder" in out.stderr
    assert "starting" not in out.stderr


def test_serve_refuses_a_generation_config_the_engine_would_refuse_before_starting_anything(tiny_model_factory,
                                                                                            tmp_path):
    model = with_generation_config(tiny_model_factory("llama"), tmp_path, {"top_p": 0})
    out = tandem("serve", "--model", str(model))
    assert out.returncode == 2 and "starting" not in out.stderr
    assert f"tandem: error: {model / 'generation_config.json'}: top_p: must be in (0, 1]" in out.stderr


@pytest.mark.slow
def test_generate_on_disaggregated_tensor_parallel_groups_gives_hfs_tokens(tiny_model_factory):
    """-tp 2 --disaggregate: a local Ray, a prefill and a decode group of two ranks each, the KV moved between."""
    model = tiny_model_factory("llama")
    prompt = "The quick brown fox jumps over the lazy dog"
    out = tandem("generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "8", "--ignore-eos",
                 "--json", "--tensor-parallel-size", "2", "--disaggregate", "--num-kv-blocks", "64")
    assert out.returncode == 0, out.stderr
    prompt_ids = AutoTokenizer.from_pretrained(model).encode(prompt)
    assert json.loads(out.stdout)["token_ids"] == hf_greedy(model, prompt_ids, 8)

