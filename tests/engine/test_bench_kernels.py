"""`tandem bench kernels` end to end. In a process of its own: without CUDA the bench turns Triton's interpreter
on, which works only before triton is first imported, and this pytest process has imported it already."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULT_KEYS = {"batch", "context_len", "torch_ms", "triton_ms", "kv_bytes_read", "roofline_ms", "max_abs_diff"}


def test_kernels_bench_smoke_run_writes_every_figure(tmp_path):
    path = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "kernels", "--smoke", "--json", str(path)],
                          cwd=Path(__file__).parents[2], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    doc = json.loads(path.read_text())
    assert doc["config"]["smoke"] and doc["bandwidth_gb_s"] > 0
    assert doc["times_meaningful"] == torch.cuda.is_available()
    assert [(r["batch"], r["context_len"]) for r in doc["results"]] == [(1, 40), (3, 40)]
    for r in doc["results"]:
        assert RESULT_KEYS <= r.keys()
        assert r["torch_ms"] > 0 and r["triton_ms"] > 0 and r["roofline_ms"] > 0
        assert r["kv_bytes_read"] == 2 * r["batch"] * 40 * 2 * 64 * 4  # K and V, 2 KV heads, head_dim 64, float32
        assert r["max_abs_diff"] < 1e-4
    assert "roofline ms" in done.stdout
    if not torch.cuda.is_available():
        assert "NOT meaningful" in done.stdout
