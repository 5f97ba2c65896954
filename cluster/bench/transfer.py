"""`tandem bench transfer`: KV transfer bandwidth and the latency it adds per request, by prompt length.

A receiver process and this process open a real KV channel (gloo on CPU, NCCL on GPU) and move the KV blocks a
prompt of each length occupies, with the model's real KV shape. The time is the sender's wall clock from the
start of `send` until the receiver reports the blocks written into its cache (a multiprocessing queue carries
that acknowledgement, adding well under a millisecond).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cluster.bench.machine import machine_info

_LENGTHS = (128, 256, 512, 1024, 2048, 4096)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="whose KV shape to move (config.json is all it reads)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(_LENGTHS),
                        help="prompt lengths in tokens (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="transfers per length; the median is reported")
    parser.add_argument("--tensor-parallel-size", type=int, default=3,
                        help="ranks for the step-overhead measurement; the model's heads must divide by it "
                             "(default 3, as SmolLM2's 9 heads and 3 KV heads need); 1 skips it")
    parser.add_argument("--json", default="bench-results/transfer.json", help="where to write the figures")


def _kv_shape(model: str) -> tuple[int, int, int]:
    from transformers import AutoConfig

    from cluster.config import cache_dir
    from workers.engine.model_store import resolve_model
    from workers.engine.models.llama import head_dim_of

    config = AutoConfig.from_pretrained(resolve_model(model, cache_dir()))
    return config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config)


def _caches(layers: int, blocks: int, heads: int, dim: int):
    import torch

    return [(torch.randn(blocks, 16, heads, dim), torch.randn(blocks, 16, heads, dim)) for _ in range(layers)]


def _receiver(addresses, acks, shape: tuple[int, int, int], plan: list[int]) -> None:
    import torch

    from workers.kv_transfer import KVChannel

    layers, heads, dim = shape
    channel = KVChannel.connect(addresses.get(), torch.device("cpu"))
    caches = _caches(layers, max(plan), heads, dim)
    for num_blocks in plan:
        channel.recv(caches, list(range(num_blocks)))
        acks.put(num_blocks)


def run(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    import torch

    from workers.kv_transfer import KVChannel, listen

    layers, heads, dim = _kv_shape(args.model)
    lengths = sorted(args.lengths)
    plan = [-(-n // 16) for n in lengths for _ in range(args.repeats + 1)]  # +1: a warm-up transfer per length
    ctx = mp.get_context("spawn")
    addresses, acks = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=_receiver, args=(addresses, acks, (layers, heads, dim), plan), daemon=True)
    peer.start()
    store, address = listen("127.0.0.1")
    addresses.put(address)
    channel = KVChannel(store, 0, torch.device("cpu"))
    caches = _caches(layers, max(plan), heads, dim)
    rows = []
    for n in lengths:
        num_blocks, times, nbytes = -(-n // 16), [], 0
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            nbytes = channel.send(caches, list(range(num_blocks))).wait()
            acks.get()
            if i:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append(dict(prompt_tokens=n, blocks=num_blocks, bytes=nbytes, seconds=median,
                         gb_per_s=nbytes / median / 1e9))
    peer.join(timeout=30)
    print(_table(rows, layers, heads, dim))
    tp_row = None
    if args.tensor_parallel_size > 1:
        from cluster.bench import tp_step
        from cluster.config import cache_dir
        from workers.engine.model_store import resolve_model

        tp_row = tp_step.measure(str(resolve_model(args.model, cache_dir())), args.tensor_parallel_size)
        print()
        print(tp_step.table(tp_row))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(model=args.model, kv_shape=dict(layers=layers, kv_heads=heads, head_dim=dim,
                                                                     block_size=16, dtype="float32"),
                                    backend="gloo", machine=machine_info(), results=rows,
                                    tp_step_overhead=tp_row), indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _table(rows: list[dict], layers: int, heads: int, dim: int) -> str:
    lines = [f"KV transfer over gloo, {layers} layers x {heads} KV heads x {dim} dims, float32, 16-token blocks",
             f"{'prompt tokens':>13}  {'blocks':>6}  {'MiB':>8}  {'added latency ms':>16}  {'GB/s':>6}"]
    for r in rows:
        lines.append(f"{r['prompt_tokens']:>13}  {r['blocks']:>6}  {r['bytes'] / 2**20:>8.1f}  "
                     f"{r['seconds'] * 1e3:>16.1f}  {r['gb_per_s']:>6.2f}")
    return "\n".join(lines)
