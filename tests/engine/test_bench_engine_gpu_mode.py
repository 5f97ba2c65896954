"""`tandem bench engine --random-weights CONFIG`, the roofline mode that `--device cuda` runs on a GPU, end to end
on the CPU with the tiny random config: every table row, the roofline's byte and FLOP counts, the agreement with HF
and the note that CPU times say nothing about the roofline. The KV cache is sized so that one decode row cannot fit.
"""

import contextlib
import io
import json

import pytest

from cluster.bench.engine_roofline import SMOKE, agreement
from cluster.cli import main

# The tiny config: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 1024, untied; float32 on CPU.
LAYER_MATMUL_PARAMS = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64
WEIGHT_BYTES = 4 * (1024 * 64 + 2 * (LAYER_MATMUL_PARAMS + 2 * 64) + 64)  # everything but the input embedding
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, float32
CACHE_GB = 13.5 * 16 * KV_BYTES_PER_TOKEN / 2**30  # 13 blocks of 16 tokens


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The JSON document, with the printed table under "stdout"."""
    folder = tmp_path_factory.mktemp("bench")
    path, stdout = folder / "engine.json", io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(stdout):
        env.setenv("TANDEM_CACHE_DIR", str(folder / "cache"))
        code = main(["bench", "engine", "--random-weights", "tiny", "--kv-cache-memory-gb", str(CACHE_GB),
                     "--json", str(path)])
    assert code == 0
    return dict(json.loads(path.read_text()), stdout=stdout.getvalue())


def test_every_decode_row_is_timed_against_its_roofline_or_says_why_not(bench):
    rows = {(r["batch"], r["context_len"]): r for r in bench["decode"]}
    assert list(rows) == [(b, n) for n in SMOKE.context_lens for b in SMOKE.batch_sizes]
    for (batch, context_len), row in rows.items():
        assert row["weight_bytes"] == WEIGHT_BYTES
        assert row["kv_bytes"] == batch * context_len * KV_BYTES_PER_TOKEN
        assert row["roofline_ms"] == pytest.approx((WEIGHT_BYTES + row["kv_bytes"]) / bench["bandwidth_gb_s"] / 1e6)
    assert rows[4, 64]["skipped"] == "K/V of 4 x 64 tokens need 16 blocks; the cache holds 13"
    assert all(rows[key]["step_ms"] > 0 for key in [(1, 32), (4, 32), (1, 64)])


def test_a_batch_1_step_is_broken_down_by_what_runs_in_it(bench):
    breakdown = bench["batch1_breakdown"]
    assert breakdown["context_len"] == SMOKE.context_lens[0] and breakdown["device"] == "cpu ops"
    assert breakdown["launches"] >= sum(t["count"] for t in breakdown["top"]) > 0
    assert breakdown["device_ms"] >= sum(t["ms"] for t in breakdown["top"]) > 0
    assert "aten::mm" in {t["name"] for t in breakdown["top"]}  # the projections
    assert breakdown["replay_ms"] is None  # no CUDA graph to replay on a CPU
    assert "profiled eagerly" in bench["stdout"]


def test_prefill_is_held_to_two_flops_per_matmul_parameter_and_token(bench):
    (row,) = bench["prefill"]
    assert (row["prompts"], row["tokens"], row["matmul_params"]) == (1, SMOKE.prefill_len, 2 * LAYER_MATMUL_PARAMS)
    flops = 2 * row["matmul_params"] * row["tokens"]
    assert row["flop_rate_share"] == pytest.approx(flops / (row["step_ms"] / 1e3) / (bench["matmul_tflop_s"] * 1e12))


def test_offline_runs_tandem_and_hf_on_the_same_prompts_and_in_float32_they_agree(bench):
    tandem, hf = bench["offline"]
    assert (tandem["system"], hf["system"]) == ("tandem", "hf-batch")
    assert [len(o) for o in tandem["outputs"]] == [SMOKE.output_tokens] * SMOKE.num_requests
    assert tandem["outputs"] == hf["outputs"]
    assert (tandem["match_pct"], tandem["agreement"]) == (100.0, 1.0)
    assert [t["name"] for t in bench["targets"]] == [
        "decode batch 1, context 32: roofline / step time", "decode batch 1, context 64: roofline / step time",
        f"prefill 1 x {SMOKE.prefill_len} tokens: share of the matmul rate",
        "offline: Tandem / HF padded batch output tok/s"]


def test_the_cpu_run_says_its_times_are_not_meaningful(bench):
    assert bench["times_meaningful"] is False
    assert bench["config"]["random_weights"] == "tiny" and bench["config"]["dtype"] == "torch.float32"
    assert "these times are NOT meaningful for the roofline comparison" in bench["stdout"]
    assert "skipped: K/V of 4 x 64 tokens need 16 blocks" in bench["stdout"]
    assert bench["stdout"].count("n/a on CPU") == 4 and "PASS" not in bench["stdout"]


def test_agreement_counts_whole_matches_and_the_shared_prefix_of_each_request():
    assert agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 0, 8]]) == (50.0, 0.75)
