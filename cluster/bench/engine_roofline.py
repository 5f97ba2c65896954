"""`tandem bench engine --device cuda` (or `--random-weights CONFIG`): the engine against the device's limits.

Three measurements in one run and one process, each next to the figure it is held to:
- decode step time at each batch size x context length against the roofline: the bytes a step must read (every
  weight but the input embedding, of which a step reads only its tokens' rows, plus every context token's K and V
  in every layer) over the device-to-device bandwidth measured in the same run; with CUDA graphs, the same step
  run eagerly beside it, which is what the graphs save;
- prefill throughput on whole prompts against 2 x (matmul parameters) x tokens FLOPs at the matmul rate measured
  in the same run, in the engine's dtype (attention's own FLOPs, ~4% at 2k tokens, are not counted);
- offline throughput on a mixed workload against HF transformers (sdpa, left-padded batches) on the same device;
and, to show where batch-1 decode time goes, one eager step under the profiler, its kernels by time, beside the
step's CUDA graph replayed alone (its device time less the kernels' is the gaps between them; the step's time less
it, the host's part).

Decode and prefill steps are timed on the engine's model runner itself: one `execute` (inputs, forward pass,
sampling) of sequences whose blocks are scattered over the whole cache, as after hours of serving. Their K/V hold
whatever the cache holds, which costs the same to read. A batch whose K/V do not fit in the cache is reported as
such. Random weights make tokens meaningless, so greedy agreement with HF is reported, not required.

Without CUDA it runs a tiny shape in float32: a smoke test of the command, whose times say nothing of a GPU.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cluster.bench import ceilings, random_model, report, systems
from cluster.bench.machine import machine_info

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch_sizes: tuple[int, ...]
    context_lens: tuple[int, ...]
    decode_repeats: int
    prefill_len: int
    prefill_prompts: tuple[int, ...]  # prompts per prefill step
    prefill_repeats: int
    num_requests: int
    min_prompt: int
    max_prompt: int
    output_tokens: int
    max_num_batched_tokens: int


GPU = Sizes(batch_sizes=(1, 8, 32, 128, 256), context_lens=(1024, 4096), decode_repeats=20, prefill_len=2048,
            prefill_prompts=(1, 4), prefill_repeats=5, num_requests=64, min_prompt=32, max_prompt=1024,
            output_tokens=128, max_num_batched_tokens=8192)
SMOKE = Sizes(batch_sizes=(1, 4), context_lens=(32, 64), decode_repeats=2, prefill_len=64, prefill_prompts=(1,),
              prefill_repeats=1, num_requests=4, min_prompt=8, max_prompt=24, output_tokens=4,
              max_num_batched_tokens=1024)
DECODE_GOAL = 1 / 1.3  # roofline / step time: batch-1 decode within 1.3x of the roofline
PREFILL_GOAL = 0.5  # share of the measured matmul rate
OFFLINE_GOAL = 3.0  # Tandem / HF padded batch, output tokens per second


def run(args: argparse.Namespace, log: Log) -> int:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tandem bench engine: --device cuda, but torch sees no CUDA device")
    meaningful = device.type == "cuda"
    sizes = _sizes(args, GPU if meaningful and not args.quick else SMOKE)
    folder = _model_folder(args, device, log)
    dtype = torch.bfloat16 if meaningful else torch.float32
    bandwidth, matmul = ceilings.copy_bandwidth(device), ceilings.matmul_rate(device, dtype)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, {dtype} matmul {matmul / 1e12:.3g} TFLOP/s")
    prompts = _prompts(sizes, _vocab_size(folder), random.Random(args.seed))
    hf = None if args.skip_hf else _hf_offline(folder, device, dtype, prompts, sizes.output_tokens,
                                               args.hf_batch_size or len(prompts), log)
    llm = _engine(folder, device, dtype, sizes, args.kv_cache_memory_gb)
    runner = llm.engine.runner
    rng = random.Random(args.seed)
    decode = _decode_rows(runner, sizes, bandwidth, rng, log)
    breakdown = _kernel_breakdown(runner, sizes.context_lens[0], decode, rng, log)
    prefill = _prefill_rows(runner, sizes, matmul, rng, log)
    offline = _offline(llm, prompts, sizes.output_tokens, hf, log)
    verdicts = _targets(decode, prefill, offline)
    graphs = runner.decode_graphs.batch_sizes if runner.decode_graphs else []
    title = (f"{args.random_weights or folder.name} ({'random weights, ' if args.random_weights else ''}{dtype}) "
             f"on {_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, matmul "
             f"{matmul / 1e12:.3g} TFLOP/s; decode " + (f"CUDA graphs up to batch {graphs[-1]}" if graphs else "eager"))
    print(format_report(title, meaningful, decode, prefill, offline, verdicts))
    print(format_breakdown(breakdown))
    if runner.fusion_replay_ms:
        print(f"small-batch projections {runner.small_batch_way}: the batch-1 graph (padding rows) took " + ", ".join(
            f"{name} {'-' if ms is None else f'{ms:.3f} ms'}" for name, ms in runner.fusion_replay_ms.items())
              + " (- where they failed to build)")
    doc = dict(config=dict(dataclasses.asdict(sizes), model=str(folder), random_weights=args.random_weights,
                           dtype=str(dtype), tandem_engine=dataclasses.asdict(llm.engine.config),
                           num_kv_blocks=runner.num_kv_blocks, graph_batch_sizes=graphs,
                           small_batch_fusion=dict(dataclasses.asdict(runner.model.fusion),
                                                   way=runner.small_batch_way, replay_ms=runner.fusion_replay_ms)),
               machine=dict(machine_info(), device=_device_name(device)), times_meaningful=meaningful,
               bandwidth_gb_s=bandwidth / 1e9, matmul_tflop_s=matmul / 1e12, decode=decode, prefill=prefill,
               offline=offline, batch1_breakdown=breakdown, targets=[t.as_dict() for t in verdicts])
    path = Path(args.json or "bench-results/engine-roofline.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"done; wrote {path}")
    return 0


def _model_folder(args: argparse.Namespace, device, log: Log) -> Path:
    from cluster.config import cache_dir
    from workers.engine.model_store import resolve_model

    if not args.random_weights:
        return resolve_model(args.model, cache_dir())
    log(f"random {args.random_weights} weights")
    return random_model.build(args.random_weights, cache_dir() / "random-weights" / args.random_weights, device.type,
                              args.seed)


def _sizes(args: argparse.Namespace, sizes: Sizes) -> Sizes:
    """The mode's sizes with the mixed-workload flags given on the command line on top."""
    given = {key: getattr(args, key) for key in ("num_requests", "min_prompt", "max_prompt", "output_tokens")
             if getattr(args, key) is not None}
    sizes = dataclasses.replace(sizes, **given)
    if not 0 < sizes.min_prompt <= sizes.max_prompt:
        raise SystemExit("tandem bench engine: need 0 < --min-prompt <= --max-prompt")
    return sizes


def _vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def _prompts(sizes: Sizes, vocab_size: int, rng: random.Random) -> list[list[int]]:
    """Random token ids: with random weights no text means more than any other."""
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(sizes.min_prompt, sizes.max_prompt))]
            for _ in range(sizes.num_requests)]


def _engine(folder: Path, device, dtype, sizes: Sizes, kv_cache_memory_gb: float | None):
    import torch

    from workers.engine.llm import LLM

    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache takes a share of free memory, and cached blocks do not count as free
    max_model_len = max(*sizes.context_lens, sizes.prefill_len, sizes.max_prompt + sizes.output_tokens)
    return LLM(str(folder), device=device.type, dtype=str(dtype).removeprefix("torch."),
               attention_backend="triton" if device.type == "cuda" else "torch", max_model_len=max_model_len,
               max_num_seqs=max(sizes.batch_sizes), max_num_batched_tokens=sizes.max_num_batched_tokens,
               kv_cache_memory_gb=kv_cache_memory_gb or 0.25, progress=False)


# -- decode and prefill steps on the model runner -------------------------------------------------------------


def _sequences(runner, num: int, length: int, num_computed: int, rng: random.Random) -> list:
    """`num` sequences of `length` random tokens, `num_computed` of them in the cache, in blocks drawn at random
    from the whole cache."""
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.sequence import Sequence

    block_size, vocab_size = runner.block_size, runner.hf_config.vocab_size
    per_seq = -(-length // block_size)
    blocks = rng.sample(range(runner.num_kv_blocks), num * per_seq)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(num):
        seq = Sequence(f"bench-{i}", [rng.randrange(vocab_size) for _ in range(length)], params, block_size)
        seq.num_computed_tokens = num_computed
        seq.block_table = blocks[i * per_seq:(i + 1) * per_seq]
        seqs.append(seq)
    return seqs


def _step_s(runner, step: list, repeats: int) -> float:
    """Median seconds of one runner step (it returns sampled tokens, so the device is done when it returns)."""
    runner.execute(step)  # warm-up: kernels compile, workspaces grow
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_rows(runner, sizes: Sizes, bandwidth: float, rng: random.Random, log: Log) -> list[dict]:
    k_cache = runner.kv_caches[0][0]
    kv_per_token = 2 * len(runner.kv_caches) * k_cache[0, 0].numel() * k_cache.element_size()
    weights = weight_bytes(runner.model)
    rows = []
    for context_len in sizes.context_lens:
        for batch in sizes.batch_sizes:
            kv_bytes = batch * context_len * kv_per_token
            row = dict(batch=batch, context_len=context_len, weight_bytes=weights, kv_bytes=kv_bytes,
                       roofline_ms=(weights + kv_bytes) / bandwidth * 1e3)
            needed = batch * -(-context_len // runner.block_size)
            if needed > runner.num_kv_blocks:
                row["skipped"] = (f"K/V of {batch} x {context_len} tokens need {needed} blocks; the cache holds "
                                  f"{runner.num_kv_blocks}")
            else:
                log(f"decode step: batch {batch}, context {context_len}")
                step = [(seq, 1) for seq in _sequences(runner, batch, context_len, context_len - 1, rng)]
                row["step_ms"] = _step_s(runner, step, sizes.decode_repeats) * 1e3
                if runner.decode_graphs is not None:  # the same step without graphs: what they save
                    with _eager(runner):
                        row["eager_step_ms"] = _step_s(runner, step, sizes.decode_repeats) * 1e3
            rows.append(row)
    return rows


@contextlib.contextmanager
def _eager(runner):
    """Runs the runner's decode steps without its CUDA graphs for the duration."""
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        yield
    finally:
        runner.decode_graphs = graphs


def _kernel_breakdown(runner, context_len: int, decode: list[dict], rng: random.Random, log: Log) -> dict:
    """Where a batch-1 decode step's time goes: one eager step under the profiler, its device work by kernel
    (launches and time; on a CPU, its ops' own time). A CUDA graph replays the same kernels, so the graph step's
    time less the kernels' sum is what passes between them (launch gaps, the host's part of the step)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    log(f"profiling one eager decode step: batch 1, context {context_len}")
    cuda = runner.device.type == "cuda"
    step = [(seq, 1) for seq in _sequences(runner, 1, context_len, context_len - 1, rng)]
    try:
        with _eager(runner):
            runner.execute(step)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                runner.execute(step)
                if cuda:
                    torch.cuda.synchronize()
    except RuntimeError as e:  # the profiler needs CUPTI, which a machine may lack: the rest of the run stands
        return dict(context_len=context_len, error=f"{type(e).__name__}: {e}")
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    own_us = [(e.self_device_time_total if cuda else e.self_cpu_time_total, e) for e in events]
    own_us = sorted(((us, e) for us, e in own_us if us > 0), key=lambda item: -item[0])
    graph_ms = next((r["step_ms"] for r in decode if r["batch"] == 1 and r["context_len"] == context_len
                     and "step_ms" in r), None)
    return dict(context_len=context_len, device="kernels" if cuda else "cpu ops",
                launches=sum(e.count for _, e in own_us), device_ms=sum(us for us, _ in own_us) / 1e3,
                step_ms=graph_ms, replay_ms=_replay_ms(runner, [seq for seq, _ in step]),
                top=[dict(name=e.key[:80], count=e.count, ms=us / 1e3) for us, e in own_us[:12]])


def _replay_ms(runner, seqs: list) -> float | None:
    """Device milliseconds of the step's CUDA graph alone (DecodeGraphs.replay_ms); None without one."""
    graphs = runner.decode_graphs
    if graphs is None or not graphs.graphs:
        return None
    return graphs.replay_ms(graphs.prepare(seqs))


def format_breakdown(b: dict) -> str:
    if "error" in b:
        return f"\nbatch-1 decode step, context {b['context_len']}: not profiled ({b['error']})"
    lines = ["", f"batch-1 decode step, context {b['context_len']}, profiled eagerly: {b['launches']} {b['device']} "
                 f"taking {b['device_ms']:.3f} ms" + (f"; the measured step takes {b['step_ms']:.3f} ms"
                                                        if b["step_ms"] else "")]
    if b.get("replay_ms"):
        lines.append(f"its CUDA graph replayed alone takes {b['replay_ms']:.3f} ms on the device: "
                     f"{b['replay_ms'] - b['device_ms']:.3f} ms between kernels, "
                     f"{b['step_ms'] - b['replay_ms']:.3f} ms of the step on the host (inputs in, sampling)")
    lines.append(f"{'ms':>8}  {'count':>5}  name")
    lines += [f"{t['ms']:>8.3f}  {t['count']:>5}  {t['name']}" for t in b["top"]]
    return "\n".join(lines)


def _prefill_rows(runner, sizes: Sizes, matmul: float, rng: random.Random, log: Log) -> list[dict]:
    params = matmul_params(runner.model)
    rows = []
    for num in sizes.prefill_prompts:
        log(f"prefill step: {num} x {sizes.prefill_len} tokens")
        seqs = _sequences(runner, num, sizes.prefill_len, 0, rng)
        seconds = _step_s(runner, [(seq, sizes.prefill_len) for seq in seqs], sizes.prefill_repeats)
        tokens = num * sizes.prefill_len
        rows.append(dict(prompts=num, prompt_len=sizes.prefill_len, tokens=tokens, step_ms=seconds * 1e3,
                         matmul_params=params, tokens_per_s=tokens / seconds,
                         flop_rate_share=2 * params * tokens / seconds / matmul))
    return rows


def weight_bytes(model) -> int:
    """What a decode step reads of the weights: all of them but the input embedding (a step reads only its
    tokens' rows), unless the LM head is that same matrix."""
    embedding = None if model.tie_word_embeddings else model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def matmul_params(model) -> int:
    """Weights every prompt token is multiplied by: the decoder layers' projections. Norms are not matmuls, and
    the LM head runs on one token per prompt."""
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


# -- offline throughput: Tandem against HF on the same prompts ------------------------------------------------


def _hf_offline(folder: Path, device, dtype, prompts: list[list[int]], output_tokens: int, batch_size: int,
                log: Log) -> dict:
    """HF generate over left-padded batches in request order; the model is freed before the engine loads."""
    import torch
    from transformers import AutoModelForCausalLM

    log(f"loading HF transformers ({dtype}, sdpa)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                 device_map=device.type).eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, as Tandem's ignore_eos
    _hf_generate(model, device, prompts[:2], 2)  # warm-up: CUDA context, kernels, allocator
    log(f"offline, HF padded batch: {len(prompts)} requests in batches of {batch_size}")
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), batch_size):
        outputs += _hf_generate(model, device, prompts[i:i + batch_size], output_tokens)
    wall = time.perf_counter() - start
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(system=report.HF_BATCH, outputs=outputs, wall_s=wall)


def _hf_generate(model, device, prompts: list[list[int]], output_tokens: int) -> list[list[int]]:
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=output_tokens, pad_token_id=0)
    return out[:, width:].tolist()


def _offline(llm, prompts: list[list[int]], output_tokens: int, hf: dict | None, log: Log) -> list[dict]:
    systems.warm_up_tandem(llm, prompts[0][:8])
    log(f"offline, Tandem: {len(prompts)} requests added at once")
    tandem = systems.tandem_waves(llm, [prompts], output_tokens, "Tandem")
    rows = [dict(system=report.TANDEM, outputs=tandem.outputs, wall_s=tandem.wall_s)]
    if hf is not None:
        rows.append(hf)
        rows[0].update(zip(("match_pct", "agreement"), agreement(tandem.outputs, hf["outputs"])))
    for row in rows:
        row["output_tokens_per_s"] = sum(map(len, row["outputs"])) / row["wall_s"]
    return rows


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(% of requests whose tokens all equal the reference's, the mean share of each request's tokens before its
    first difference): greedy agreement on the first N tokens."""
    prefixes = []
    for ours, theirs in zip(outputs, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        prefixes.append(same / max(len(theirs), 1))
    return 100.0 * sum(p == 1.0 for p in prefixes) / len(prefixes), sum(prefixes) / len(prefixes)


# -- the verdicts and the table -------------------------------------------------------------------------------


def _targets(decode: list[dict], prefill: list[dict], offline: list[dict]) -> list[report.Target]:
    found = [report.Target(f"decode batch 1, context {r['context_len']}: roofline / step time",
                           r["roofline_ms"] / r["step_ms"], DECODE_GOAL)
             for r in decode if r["batch"] == 1 and "step_ms" in r]
    found += [report.Target(f"prefill {r['prompts']} x {r['prompt_len']} tokens: share of the matmul rate",
                            r["flop_rate_share"], PREFILL_GOAL) for r in prefill]
    if len(offline) == 2:
        found.append(report.Target("offline: Tandem / HF padded batch output tok/s",
                                   offline[0]["output_tokens_per_s"] / offline[1]["output_tokens_per_s"],
                                   OFFLINE_GOAL))
    return found


def format_report(title: str, meaningful: bool, decode: list[dict], prefill: list[dict], offline: list[dict],
                  verdicts: list[report.Target]) -> str:
    lines = [title]
    if not meaningful:
        lines.append("NOTE: no GPU: a tiny model on the CPU; these times are NOT meaningful for the roofline "
                     "comparison (a smoke test of the command)")
    lines += ["", "decode step (one new token per sequence)",
              f"{'batch':>5}  {'context':>7}  {'weights+KV GiB':>14}  {'step ms':>9}  {'roofline ms':>11}  "
              f"{'roofline / step':>15}  {'eager ms':>9}"]
    for r in decode:
        gib = (r["weight_bytes"] + r["kv_bytes"]) / 2**30
        eager = f"  {r['eager_step_ms']:>9.3f}" if "eager_step_ms" in r else ""
        measured = (f"{r['step_ms']:>9.3f}  {r['roofline_ms']:>11.3f}  {r['roofline_ms'] / r['step_ms']:>14.0%}{eager}"
                    if "step_ms" in r else f"skipped: {r['skipped']}")
        lines.append(f"{r['batch']:>5}  {r['context_len']:>7}  {gib:>14.2f}  {measured}")
    lines += ["", "prefill step (whole prompts)",
              f"{'prompts':>7}  {'tokens':>7}  {'step ms':>9}  {'tokens/s':>10}  {'share of matmul rate':>20}"]
    lines += [f"{r['prompts']:>7}  {r['tokens']:>7}  {r['step_ms']:>9.2f}  {r['tokens_per_s']:>10.0f}  "
              f"{r['flop_rate_share']:>19.0%}" for r in prefill]
    lines += ["", "offline mixed workload",
              f"{'system':<10}  {'requests':>8}  {'output tok/s':>12}  {'wall s':>8}  {'match %':>7}  "
              f"{'agreement':>9}"]
    for r in offline:
        match = f"{r['match_pct']:>7.0f}  {r['agreement']:>9.0%}" if "match_pct" in r else f"{'ref':>7}  {'':>9}"
        lines.append(f"{r['system']:<10}  {len(r['outputs']):>8}  {r['output_tokens_per_s']:>12.1f}  "
                     f"{r['wall_s']:>8.2f}  {match}")
    if verdicts:
        width = max(len(t.name) for t in verdicts)
        lines.append("")
        lines += [f"{t.name.ljust(width)}  {t.ratio:6.2f}  (target >= {t.goal:.2f})  "
                  f"{('PASS' if t.passed else 'MISS') if meaningful else 'n/a on CPU'}" for t in verdicts]
    return "\n".join(lines)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
