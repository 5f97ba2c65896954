"""`tandem bench engine --quick` end to end, in-process: every phase runs and the JSON holds what the docs promise."""

import argparse
import json
import math
import random
import statistics

import pytest
from transformers import AutoTokenizer

from cluster.bench import serve as serve_bench
from cluster.bench import workloads
from cluster.cli import main

SYSTEMS = [("mixed", "hf-sequential"), ("mixed", "hf-batch"), ("mixed", "tandem"),
           ("shared-prefix", "tandem-cache-on"), ("shared-prefix", "tandem-cache-off"),
           ("evicted-prefix", "tandem-host-tier"), ("evicted-prefix", "tandem-no-host-tier")]
RESULT_KEYS = {"workload", "system", "requests", "output_tokens", "wall_s", "output_tokens_per_s", "ttft_p50_s",
               "ttft_p99_s", "rss_start_mib", "rss_peak_mib", "match_pct", "is_reference", "cached_tokens", "ttft_s"}


def test_quick_bench_writes_every_result(tmp_path, capsys):
    path = tmp_path / "engine.json"
    assert main(["bench", "engine", "--quick", "--json", str(path)]) == 0

    doc = json.loads(path.read_text())
    assert {"config", "machine", "results", "targets"} <= doc.keys()
    assert {"torch", "torch_threads", "cpu_count", "hf_attention"} <= doc["machine"].keys()
    cfg = doc["config"]
    assert cfg["quick"] and cfg["tandem_engine"]["num_kv_blocks"] > 0
    results = doc["results"]
    assert [(r["workload"], r["system"]) for r in results] == SYSTEMS
    for r in results:
        assert RESULT_KEYS <= r.keys()
        assert len(r["ttft_s"]) == r["requests"] and all(t > 0 for t in r["ttft_s"])
        assert r["output_tokens_per_s"] > 0
    mixed, shared, evicted = results[:3], results[3:5], results[5:]
    assert all(r["output_tokens"] == cfg["num_requests"] * cfg["output_tokens"] for r in mixed)
    per_user = cfg["shared_output_tokens"]
    assert all(r["output_tokens"] == cfg["shared_prefixes"] * cfg["users_per_prefix"] * per_user
               for r in shared + evicted)
    # Later waves reuse their system prompt's blocks only when caching is on.
    assert shared[0]["cached_tokens"] > 0 and shared[1]["cached_tokens"] == 0
    # One at a time on a cache too small to keep them, system prompts come back whole from the host tier, and its
    # copies change no token.
    every_return = (cfg["users_per_prefix"] - 1) * cfg["shared_prefixes"] * cfg["prefix_tokens"]
    assert evicted[0]["cached_tokens"] == every_return > evicted[1]["cached_tokens"]
    assert evicted[0]["match_pct"] == 100
    assert [t["goal"] for t in doc["targets"]] == [4.0, 1.5, 3.0, 2.0]

    table = capsys.readouterr().out
    assert "TTFT p50" in table and "tandem-cache-on" in table and "target >= 4x" in table


def test_workloads_are_seeded_and_shaped():
    corpus = list(range(5000))
    a = workloads.mixed_workload(corpus, 10, 5, 20, 3, random.Random(1))
    assert a == workloads.mixed_workload(corpus, 10, 5, 20, 3, random.Random(1))
    assert all(5 <= len(p) <= 20 for p in a.prompts)
    assert len({p[0] for p in a.prompts}) == 10  # distinct starts: nothing for a prefix cache to share

    s = workloads.shared_prefix_workload(corpus, 3, 4, 50, (2, 6), 3, random.Random(1))
    assert len(s.waves) == 4 and all(len(w) == 3 for w in s.waves)
    assert len({x for p in s.prefixes for x in p}) == 3 * 50  # system prompts never overlap
    for wave in s.waves:
        for prefix, prompt in zip(s.prefixes, wave):
            assert prompt[:50] == prefix and 2 <= len(prompt) - 50 <= 6


def test_serve_bench_arrivals_are_a_seeded_poisson_process_or_all_at_once():
    gaps = serve_bench.arrival_gaps(4000, 8.0, seed=3)
    assert gaps == serve_bench.arrival_gaps(4000, 8.0, seed=3)  # every target gets the same schedule
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8.0, rel=0.1)  # exponential: the spread equals the mean
    assert serve_bench.arrival_gaps(5, math.inf, seed=3) == [0.0] * 5


def test_serve_bench_reads_sharegpt_conversations_and_jsonl_prompts_as_vllms_bench_does(tmp_path, smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    encode = tokenizer.encode
    reply = "The capital of France is Paris, a city on the Seine."
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "What is the capital of France, please?"},
                           {"from": "gpt", "value": reply}]},
        {"conversations": [{"from": "human", "value": "Only one turn here."}]},
        {"conversations": [{"from": "human", "value": "Say nothing much at all, please."},
                           {"from": "gpt", "value": "Ok"}]},  # a reply under 4 tokens: skipped, as vLLM does
        {"conversations": [{"from": "human", "value": "x " * 1100}, {"from": "gpt", "value": reply}]}]))  # too long
    args = argparse.Namespace(seed=0, num_prompts=10, output_len=7)
    [prompt] = serve_bench.sharegpt_prompts(sharegpt, encode, args)
    assert prompt.text == "What is the capital of France, please?"
    assert (prompt.token_ids, prompt.output_tokens) == (encode(prompt.text), len(encode(reply)))

    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "Hello there"}\n\n{"prompt": "Bye", "output_tokens": 3}\n{"prompt": "unused"}\n')
    prompts = serve_bench.jsonl_prompts(lines, encode, argparse.Namespace(num_prompts=2, output_len=7))
    assert [(p.text, p.output_tokens) for p in prompts] == [("Hello there", 7), ("Bye", 3)]
    lines.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:2"):
        serve_bench.jsonl_prompts(lines, encode, argparse.Namespace(num_prompts=5, output_len=7))


def test_serve_bench_says_which_flag_fits_a_server_that_refuses_the_requests_shape():
    args = argparse.Namespace(tokenizer="smollm2")
    assert "--no-ignore-eos" in serve_bench._hint("HTTP 400: Unrecognized request argument supplied: ignore_eos", args)
    assert "smollm2's tokenizer: give the served model's as --tokenizer" in serve_bench._hint(
        "INVALID_ARGUMENT: token_ids: token id 50000 is outside the vocabulary [0, 32000)", args)
    assert serve_bench._hint("HTTP 400: temperature: must be a finite number >= 0", args) == ""


def test_serve_bench_goodput_counts_the_requests_within_every_objective():
    reply = serve_bench.Outcome(ok=True, ttft_s=0.2, latency_s=1.2, output_tokens=11)  # TPOT 100 ms
    assert reply.meets({"ttft": 250}) and not reply.meets({"ttft": 150})
    assert reply.meets({"tpot": 100, "e2el": 1200}) and not reply.meets({"ttft": 250, "tpot": 90})
    assert not serve_bench.Outcome(ok=False).meets({"e2el": 10**9})
    assert serve_bench.parse_slos(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in ("ttft", "itl:5", "tpot:0", "tpot:x", "e2el:nan"):
        with pytest.raises(ValueError, match=f"--goodput {bad}"):
            serve_bench.parse_slos([bad])


def test_transfer_bench_moves_each_length_and_writes_its_figures(tmp_path, capsys, smollm2_path):
    path = tmp_path / "transfer.json"
    assert main(["bench", "transfer", "--lengths", "40", "16", "--repeats", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["kv_shape"] == {"layers": 30, "kv_heads": 3, "head_dim": 64, "block_size": 16, "dtype": "float32"}
    assert [(r["prompt_tokens"], r["blocks"]) for r in doc["results"]] == [(16, 1), (40, 3)]
    assert all(r["bytes"] == r["blocks"] * 16 * 2 * 30 * 3 * 64 * 4 and r["gb_per_s"] > 0 for r in doc["results"])
    out = capsys.readouterr().out
    assert "added latency ms" in out and "share of step" in out
    tp = doc["tp_step_overhead"]
    assert tp["tensor_parallel_size"] == 3 and tp["steps"] > 0 and 0 < tp["share"] < 1 and tp["plan_bytes"] > 0


@pytest.mark.slow
def test_routing_bench_runs_each_router_and_writes_its_figures(tmp_path, tiny_model_factory, ray_cluster, capsys):
    """On the session's Ray, which the bench uses (and leaves running) rather than start one of its own."""
    path = tmp_path / "routing.json"
    assert main(["bench", "routing", "--model", str(tiny_model_factory("llama")), "--prefill-replicas", "1",
                 "--system-prompts", "2", "--users", "1", "--turns", "2", "--system-tokens", "48", "--arrival-rate",
                 "0", "--think-s", "0.1", "--max-tokens", "4", "--kv-cache-gb", "0.25", "--routers", "prefix-cache",
                 "round-robin", "--workloads", "shared", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert [(r["workload"], r["router"], r["requests"]) for r in doc["results"]] == [
        ("shared", "prefix-cache", 4), ("shared", "round-robin", 4)]
    assert all(0 <= r["hit_rate"] <= 1 and r["oracle_hit_rate"] > 0 and r["output_tokens_per_s"] > 0
               for r in doc["results"])
    assert all(r["ttft_stages_mean_s"]["prefill_compute_s"] > 0 for r in doc["results"])
    assert "of oracle" in out and "mean TTFT by stage" in out


def test_quick_structured_bench_compares_free_and_schema_runs(tmp_path, capsys):
    path = tmp_path / "structured.json"
    assert main(["bench", "structured", "--quick", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    free, schema = doc["results"]["free"], doc["results"]["json-schema"]
    assert free["requests"] == schema["requests"] == doc["config"]["requests"]
    assert schema["valid"] == schema["requests"]  # every reply parses and has the schema's keys
    assert doc["tokens_per_s_ratio"] == pytest.approx(schema["output_tokens_per_s"] / free["output_tokens_per_s"])
    assert "json-schema / free output tokens per second" in capsys.readouterr().out


def test_quick_embed_bench_compares_tandem_with_hfs_vectors_one_at_a_time_and_padded(tmp_path, capsys):
    path = tmp_path / "embed.json"
    assert main(["bench", "embed", "--quick", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    runs = doc["results"]
    assert list(runs) == ["hf-sequential", "hf-batch", "tandem", "tandem-cached"]
    for run in runs.values():
        assert run["documents"] == doc["config"]["documents"] == 4
        assert run["max_abs_diff"] < 1e-4 and run["min_cosine"] > 0.9999  # the same vectors, padded or cached
    assert doc["documents_per_s_ratio"] == pytest.approx(runs["tandem"]["documents_per_s"] / max(
        runs["hf-sequential"]["documents_per_s"], runs["hf-batch"]["documents_per_s"]))
    assert "Tandem / HF's faster way, documents per second" in capsys.readouterr().out


def test_quick_speculative_bench_gives_the_same_tokens_in_fewer_steps_where_text_repeats(tmp_path, capsys):
    path = tmp_path / "speculative.json"
    assert main(["bench", "speculative", "--quick", "--json", str(path)]) == 0  # 1 if any reply's tokens differ
    rows = json.loads(path.read_text())["results"]
    assert [(r["workload"], r["mode"], r["system"]) for r in rows[:2]] == [
        ("quoting", "one at a time", "one-per-step"), ("quoting", "one at a time", "speculative")]
    assert all(r["same_tokens"] for r in rows[1::2])  # greedy and seeded replies alike
    assert rows[1]["steps"] < rows[0]["steps"] and rows[1]["accepted_guesses"] > 0
    sampled = [r for r in rows[1::2] if r["workload"] == "quoting-t0.7"]
    assert sampled and all(r["accepted_guesses"] > 0 for r in sampled)
    assert "speculative / one-per-step output tok/s" in capsys.readouterr().out


def test_quick_lora_bench_runs_base_one_adapter_and_a_mix_and_mixing_changes_no_reply(tmp_path, capsys):
    path = tmp_path / "lora.json"
    assert main(["bench", "lora", "--quick", "--adapters", "2", "--rank", "4", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["config"]["adapters"] == ["random-0", "random-1"]
    assert [(r["run"], r["adapters"]) for r in report["results"]] == [
        ("base model", 0), ("one adapter", 1), ("base + 2 adapters mixed", 2)]
    assert report["results"][-1]["same_tokens"] is True  # 1 if a mixed request's tokens differ from its run alone
    assert set(report["load_on_first_use"]) == {"first_ms", "loaded_ms"}
    assert "vs base" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--lora-modules", "/adapters/sql"], "--lora-modules takes NAME=PATH pairs"),
    (["--adapters", "0"], "--adapters and --rank must be at least 1 (got 0 and 16)"),
])
def test_lora_bench_refuses_adapters_it_cannot_make_or_read(flags, message, capsys):
    assert main(["bench", "lora", "--quick", *flags]) == 2
    assert message in capsys.readouterr().err
