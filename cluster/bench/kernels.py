"""`tandem bench kernels`: one decode step of one attention layer (rotary embedding and KV write + paged decode
attention), Triton kernels against the torch backend, next to the memory roofline.

The shape is Llama-3.1-8B's attention (32 query heads, 8 KV heads, head_dim 128, bfloat16, 16-token blocks in a
shuffled block table). A decode step is bound by reading every context token's K and V, so its floor is those bytes
over the device's memory bandwidth, measured in the same run as a large device-to-device copy (a copy reads and
writes each byte once: bandwidth = 2 * size / time). Attention reads no weights; q, the output and the new K/V add
well under 1% to the bytes and are left out. Times are means over back-to-back calls, launches included.

Without CUDA it runs a tiny float32 shape through Triton's interpreter, so CI can check the command end to end;
those times are not meaningful. Only the standard library is imported at module level: the CLI builds every
parser on each invocation.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cluster.bench.machine import machine_info

BLOCK_SIZE = 16
FULL = dict(num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", batch_sizes=[1, 8, 32, 128, 256],
            context_lens=[1024, 4096], repeats=50)
SMOKE = dict(num_heads=4, num_kv_heads=2, head_dim=64, dtype="float32", batch_sizes=[1, 3], context_lens=[40],
             repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def default(key: str) -> str:
        return f"default {FULL[key]}, or {SMOKE[key]} with --smoke"

    parser.add_argument("--batch-sizes", type=int, nargs="+", help=default("batch_sizes"))
    parser.add_argument("--context-lens", type=int, nargs="+", help=default("context_lens"))
    parser.add_argument("--repeats", type=int, help=f"timed calls per figure ({default('repeats')})")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny shape (implied without CUDA, where it runs under Triton's interpreter)")
    parser.add_argument("--json", default="bench-results/kernels.json", help="where to write the figures")


def _device():
    """CUDA, or the CPU with Triton's interpreter, which must be on before triton is first imported."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ["TRITON_INTERPRET"] = "1"
    from workers.engine.attention import triton_kernels

    if not triton_kernels.INTERPRETED:
        raise RuntimeError("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set: "
                           "run `tandem bench kernels` in a process of its own")
    return torch.device("cpu")


def _seconds_per_call(fn, repeats: int, device) -> float:
    """Mean seconds per call over `repeats` back-to-back calls, after one warm-up call (which also compiles)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (64 MiB on CPU)."""
    import torch

    size = 2**30 if device.type == "cuda" else 2**26
    src, dst = torch.empty(size, dtype=torch.uint8, device=device), torch.empty(size, dtype=torch.uint8, device=device)
    return 2 * size / _seconds_per_call(lambda: dst.copy_(src), 10, device)


def _decode_step(shape: dict, batch: int, context_len: int, device, generator):
    """positions, q, k, v, caches and metadata for `batch` decodes at `context_len`, their blocks scattered over the
    cache."""
    import torch

    from workers.engine.attention.metadata import AttentionMetadata, decode_buckets

    def randn(*size):
        return torch.randn(size, generator=generator, device=device, dtype=getattr(torch, shape["dtype"]))

    blocks_per_seq = -(-context_len // BLOCK_SIZE)
    tables = torch.randperm(batch * blocks_per_seq, generator=generator, device=device).view(batch, blocks_per_seq)
    k_cache, v_cache = (randn(batch * blocks_per_seq, BLOCK_SIZE, shape["num_kv_heads"], shape["head_dim"])
                        for _ in range(2))
    q = randn(batch, shape["num_heads"], shape["head_dim"])
    k, v = (randn(batch, shape["num_kv_heads"], shape["head_dim"]) for _ in range(2))
    last = context_len - 1
    meta = AttentionMetadata(
        slot_mapping=tables[:, last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE, prefills=[], num_prefill_tokens=0,
        decode_block_tables=tables, decode_context_lens=torch.full((batch,), context_len, device=device),
        decode_buckets=decode_buckets([context_len] * batch))
    return torch.full((batch,), last, device=device), q, k, v, k_cache, v_cache, meta


def _rotary(shape: dict, max_positions: int, device):
    """Llama-3.1-8B's rope (theta 500000; its llama3 scaling changes the angles, not the work)."""
    from transformers import LlamaConfig

    from workers.engine.layers.rotary import RotaryEmbedding

    config = LlamaConfig(hidden_size=shape["num_heads"] * shape["head_dim"], num_attention_heads=shape["num_heads"],
                         num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], rope_theta=500000.0)
    return RotaryEmbedding(config, shape["head_dim"], max_positions, device)


def _measure(shape: dict, batch: int, context_len: int, device, repeats: int, bandwidth: float) -> dict:
    import torch

    from workers.engine.attention.backend import get_attention_backend

    generator = torch.Generator(device).manual_seed(batch * 100003 + context_len)
    positions, q, k, v, *rest = _decode_step(shape, batch, context_len, device, generator)
    rotary = _rotary(shape, context_len, device)
    row = dict(batch=batch, context_len=context_len)
    outputs = {}
    for name in ("torch", "triton"):
        backend = get_attention_backend(name, shape["head_dim"] ** -0.5, None, rotary)
        # Backends may rotate q and k in place: the compared outputs start from the same q and k; the timed calls
        # rotate them again and again, which changes the values, not the work.
        outputs[name] = backend.forward(positions, q.clone(), k.clone(), v, *rest)
        step = (positions, q.clone(), k.clone(), v, *rest)
        row[f"{name}_ms"] = _seconds_per_call(lambda: backend.forward(*step), repeats, device) * 1e3
    kv_bytes = 2 * batch * context_len * shape["num_kv_heads"] * shape["head_dim"] * q.element_size()
    row.update(kv_bytes_read=kv_bytes, roofline_ms=kv_bytes / bandwidth * 1e3,
               max_abs_diff=(outputs["triton"].float() - outputs["torch"].float()).abs().max().item())
    return row


def run(args: argparse.Namespace) -> int:
    device = _device()
    smoke = args.smoke or device.type != "cuda"
    shape = dict(SMOKE if smoke else FULL)
    for key in ("batch_sizes", "context_lens", "repeats"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    bandwidth = _bandwidth(device)
    rows = [_measure(shape, b, n, device, shape["repeats"], bandwidth)
            for n in shape["context_lens"] for b in shape["batch_sizes"]]
    meaningful = device.type == "cuda"
    print(_table(rows, shape, bandwidth, device, meaningful))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = dict(machine_info(), device=_device_name(device), interpreted=not meaningful)
    path.write_text(json.dumps(dict(config=dict(shape, block_size=BLOCK_SIZE, smoke=smoke), machine=machine,
                                    bandwidth_gb_s=bandwidth / 1e9, times_meaningful=meaningful, results=rows),
                               indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _table(rows: list[dict], shape: dict, bandwidth: float, device, meaningful: bool) -> str:
    lines = [f"Decode attention + rotary and KV write, one layer: {shape['num_heads']} heads, "
             f"{shape['num_kv_heads']} KV heads, head_dim {shape['head_dim']}, {shape['dtype']}, "
             f"on {_device_name(device)} (copy bandwidth {bandwidth / 1e9:.0f} GB/s)"]
    if not meaningful:
        lines.append("NOTE: no CUDA: a tiny shape through Triton's CPU interpreter; these times are NOT meaningful")
    lines.append(f"{'batch':>5}  {'context':>7}  {'KV MiB':>8}  {'torch ms':>9}  {'triton ms':>9}  {'roofline ms':>11}"
                 f"  {'% of roofline':>13}  {'vs torch':>8}  {'max |diff|':>10}")
    for r in rows:
        lines.append(f"{r['batch']:>5}  {r['context_len']:>7}  {r['kv_bytes_read'] / 2**20:>8.1f}  "
                     f"{r['torch_ms']:>9.3f}  {r['triton_ms']:>9.3f}  {r['roofline_ms']:>11.4f}  "
                     f"{100 * r['roofline_ms'] / r['triton_ms']:>12.1f}%  {r['torch_ms'] / r['triton_ms']:>7.2f}x  "
                     f"{r['max_abs_diff']:>10.2e}")
    return "\n".join(lines)
