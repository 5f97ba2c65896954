"""`tandem bench engine`: Tandem's engine against HF transformers on the same weights, in one process and one run.

Mixed workload: prompts of varied length all arriving at once, run by Tandem (continuous batching), HF one prompt
at a time and HF in left-padded batches; every system generates exactly the same number of tokens per request
(EOS ignored), and Tandem's greedy tokens are checked against HF's. Shared-prefix workload: users of a few long
system prompts arriving in waves, run by Tandem with the prefix cache on and off. Evicted-prefix workload: the same
users one at a time, taking turns across the system prompts, on a KV cache that holds about a quarter of them, so
each prompt's blocks have been evicted by the time its next user comes: Tandem with and without a host tier
(kv_offload_gb) that keeps them.

With --device cuda or --random-weights CONFIG it runs the roofline mode instead (engine_roofline.py): decode and
prefill steps against the device's measured bandwidth and matmul rate, and offline throughput against HF on the
same device.

Only the standard library and this package's light modules are imported at module level: the CLI builds this
parser on every invocation, and torch/transformers take seconds to import. On a machine without the CLI's gRPC
dependencies, `python -m cluster.bench.engine` runs the same command.
"""

import argparse
import dataclasses
import gc
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cluster.bench import random_model, report, systems, workloads
from cluster.bench.machine import machine_info
from cluster.bench.report import SystemResult

# Sizes a flag left unset takes, full run and --quick; --quick keeps the whole run to seconds on two cores.
_FULL = dict(num_requests=64, min_prompt=32, max_prompt=512, output_tokens=128, shared_prefixes=8,
             users_per_prefix=8, prefix_tokens=400, kv_cache_memory_gb=2.0)
_QUICK = dict(num_requests=4, min_prompt=8, max_prompt=32, output_tokens=8, shared_prefixes=2, users_per_prefix=2,
              prefix_tokens=32, kv_cache_memory_gb=0.25)
# The shared-prefix workload's user messages and answers: short chat turns, the case a prefix cache is for.
_USER_TOKENS = {False: (20, 60), True: (4, 12)}
_SHARED_OUTPUT_TOKENS = {False: 32, True: 8}

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str
    num_requests: int
    min_prompt: int
    max_prompt: int
    output_tokens: int
    hf_batch_size: int
    shared_prefixes: int
    users_per_prefix: int
    prefix_tokens: int
    user_tokens: tuple[int, int]
    shared_output_tokens: int
    kv_cache_memory_gb: float
    seed: int
    skip_hf: bool
    quick: bool
    json: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def sized(flag: str, kind: type, what: str) -> None:
        key = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{what} (default {_FULL[key]}; {_QUICK[key]} with --quick)")

    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct, the default) or a local HF folder")
    sized("--num-requests", int, "mixed workload: number of requests")
    sized("--min-prompt", int, "mixed workload: shortest prompt in tokens")
    sized("--max-prompt", int, "mixed workload: longest prompt in tokens")
    sized("--output-tokens", int, "mixed workload: tokens generated per request, EOS ignored")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="prompts per left-padded HF generate call (default: all of them in one batch). With "
                             "EOS ignored every row generates the same number of tokens, so no row idles while "
                             "others finish, and one batch reads the weights once per step for every request; on "
                             "a 2-core CPU one batch of 32 beat four of 8 by a few percent. It costs padding to "
                             "the longest prompt and gives everyone the TTFT of the whole padded prefill")
    sized("--shared-prefixes", int, "shared-prefix workload: number of distinct system prompts")
    sized("--users-per-prefix", int, "shared-prefix workload: users (waves) per system prompt")
    sized("--prefix-tokens", int, "shared-prefix workload: tokens per system prompt")
    sized("--kv-cache-memory-gb", float, "Tandem's KV cache size in GiB, the same for every Tandem run")
    parser.add_argument("--json", default=None,
                        help="where to write every number, the config and the machine (default "
                             "bench-results/engine.json, or bench-results/engine-roofline.json in the roofline mode)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the roofline mode, in bfloat16 with the triton attention backend (default cpu)")
    parser.add_argument("--random-weights", metavar="CONFIG", default=None, choices=sorted(random_model.CONFIGS),
                        help="the roofline mode on random weights of a known architecture instead of --model: "
                             f"{', '.join(sorted(random_model.CONFIGS))} (a tiny Llama for a CPU smoke test). The "
                             "roofline mode has its own workload sizes; the mixed-workload flags above override them")
    parser.add_argument("--skip-hf", action="store_true", help="run Tandem only (no HF baselines, no match check)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts (default 0)")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    if args.device == "cuda" or args.random_weights:
        from cluster.bench import engine_roofline

        return engine_roofline.run(args, log)
    cfg = _config(args)
    from transformers import AutoTokenizer

    from cluster.config import cache_dir
    from workers.engine.model_store import resolve_model

    model_dir = resolve_model(cfg.model, cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = workloads.corpus_token_ids(lambda text: tokenizer(text, add_special_tokens=False,
                                                               verbose=False)["input_ids"])
    rng = random.Random(cfg.seed)
    mixed = workloads.mixed_workload(corpus, cfg.num_requests, cfg.min_prompt, cfg.max_prompt, cfg.output_tokens,
                                     rng)
    shared = workloads.shared_prefix_workload(corpus, cfg.shared_prefixes, cfg.users_per_prefix, cfg.prefix_tokens,
                                              cfg.user_tokens, cfg.shared_output_tokens, rng)
    # Shorter than a KV block, so warming an engine up leaves nothing in its prefix cache.
    warm_prompt = corpus[:8]
    machine = machine_info()
    log(f"model {model_dir}, {machine['torch_threads']} torch threads, {machine['cpu_count']} CPUs")

    results: list[SystemResult] = []
    reference = None
    if not cfg.skip_hf:
        reference, hf_results, machine["hf_attention"] = _hf_phases(cfg, model_dir, mixed, tokenizer.pad_token_id,
                                                                    warm_prompt, log)
        results += hf_results
        gc.collect()
    tandem_result, engine_config = _tandem_mixed(cfg, model_dir, mixed, reference, warm_prompt, log)
    results.append(tandem_result)
    results += _shared_prefix_phases(cfg, model_dir, shared, warm_prompt, log)
    results += _evicted_prefix_phases(cfg, model_dir, shared, warm_prompt, log)

    verdicts = report.targets(results)
    print(report.format_report(results, verdicts))
    machine["loadavg_end"] = os.getloadavg()
    config = dataclasses.asdict(cfg) | dict(model_dir=str(model_dir), corpus_tokens=len(corpus),
                                            tandem_engine=engine_config, rss_method=systems.RSS_METHOD)
    report.write_json(Path(cfg.json), config, machine, results, verdicts)
    log(f"done; wrote {cfg.json}")
    return 0


def _hf_phases(cfg: BenchConfig, model_dir: Path, mixed: workloads.MixedWorkload, pad_id: int,
               warm_prompt: list[int], log: Log) -> tuple[list[list[int]], list[SystemResult], str]:
    """Returns HF sequential's tokens (the reference the others are checked against), both HF results and the
    attention implementation HF ran with, which decides how fast its baseline is."""
    log("loading HF transformers model (float32)")
    model = systems.load_hf(model_dir)
    systems.warm_up_hf(model, warm_prompt, pad_id)
    n, m = len(mixed.prompts), mixed.output_tokens
    log(f"mixed workload, HF sequential: {n} requests x {m} tokens, one generate each")
    with systems.peak_rss() as rss:
        seq = systems.hf_sequential(model, mixed.prompts, m, pad_id, "HF sequential")
    seq_result = _result(report.MIXED, report.HF_SEQUENTIAL, seq, rss, is_reference=True)
    log(f"mixed workload, HF padded batch: {n} requests in batches of {cfg.hf_batch_size}")
    with systems.peak_rss() as rss:
        batch = systems.hf_batched(model, mixed.prompts, m, pad_id, cfg.hf_batch_size, "HF padded batch")
    batch_result = _result(report.MIXED, report.HF_BATCH, batch, rss,
                           match_pct=report.match_pct(batch.outputs, seq.outputs))
    return seq.outputs, [seq_result, batch_result], model.config._attn_implementation


def _tandem_mixed(cfg: BenchConfig, model_dir: Path, mixed: workloads.MixedWorkload,
                  reference: list[list[int]] | None, warm_prompt: list[int], log: Log) -> tuple[SystemResult, dict]:
    """Also returns the engine's full configuration (batch limits, KV blocks), which the JSON records."""
    log("loading Tandem engine")
    llm = systems.load_tandem(model_dir, cfg.kv_cache_memory_gb, prefix_caching=True)
    systems.warm_up_tandem(llm, warm_prompt)
    log(f"mixed workload, Tandem: {len(mixed.prompts)} requests added at once")
    with systems.peak_rss() as rss:
        run = systems.tandem_waves(llm, [mixed.prompts], mixed.output_tokens, "Tandem")
    match = None if reference is None else report.match_pct(run.outputs, reference)
    engine_config = dataclasses.asdict(llm.engine.config) | dict(num_kv_blocks=llm.engine.runner.num_kv_blocks)
    return _result(report.MIXED, report.TANDEM, run, rss, match_pct=match), engine_config


def _shared_prefix_phases(cfg: BenchConfig, model_dir: Path, shared: workloads.SharedPrefixWorkload,
                          warm_prompt: list[int], log: Log) -> list[SystemResult]:
    """Cache off runs first and is the reference: caching must not change a single greedy token."""
    runs = {}
    for caching in (False, True):
        name = report.CACHE_ON if caching else report.CACHE_OFF
        log(f"shared-prefix workload, {name}: {len(shared.prefixes)} system prompts x {len(shared.waves)} waves")
        llm = systems.load_tandem(model_dir, cfg.kv_cache_memory_gb, prefix_caching=caching)
        systems.warm_up_tandem(llm, warm_prompt)
        with systems.peak_rss() as rss:
            runs[name] = (systems.tandem_waves(llm, shared.waves, shared.output_tokens, name), rss)
        del llm
        gc.collect()
    off, on = runs[report.CACHE_OFF], runs[report.CACHE_ON]
    return [_result(report.SHARED, report.CACHE_ON, *on, match_pct=report.match_pct(on[0].outputs, off[0].outputs)),
            _result(report.SHARED, report.CACHE_OFF, *off, is_reference=True)]


def _evicted_prefix_phases(cfg: BenchConfig, model_dir: Path, shared: workloads.SharedPrefixWorkload,
                           warm_prompt: list[int], log: Log) -> list[SystemResult]:
    """Without the host tier first: the reference, since copying blocks back must not change a greedy token. The
    host tier is as large as the other runs' KV cache."""
    from workers.engine.config import CacheConfig

    turns = [[prompt] for wave in shared.waves for prompt in wave]
    block = CacheConfig().block_size  # the engine's, which load_tandem keeps
    request_blocks = -(-(cfg.prefix_tokens + cfg.user_tokens[1] + cfg.shared_output_tokens) // block)
    num_kv_blocks = max(request_blocks + 1, len(shared.prefixes) * cfg.prefix_tokens // block // 4)
    runs = {}
    for name, offload_gb in ((report.NO_HOST_TIER, 0.0), (report.HOST_TIER, cfg.kv_cache_memory_gb)):
        log(f"evicted-prefix workload, {name}: {len(turns)} requests one at a time, {num_kv_blocks} KV blocks")
        llm = systems.load_tandem(model_dir, cfg.kv_cache_memory_gb, prefix_caching=True,
                                  num_kv_blocks=num_kv_blocks, kv_offload_gb=offload_gb)
        systems.warm_up_tandem(llm, warm_prompt)
        with systems.peak_rss() as rss:
            runs[name] = (systems.tandem_waves(llm, turns, shared.output_tokens, name), rss)
        del llm
        gc.collect()
    off, on = runs[report.NO_HOST_TIER], runs[report.HOST_TIER]
    return [_result(report.EVICTED, report.HOST_TIER, *on, match_pct=report.match_pct(on[0].outputs, off[0].outputs)),
            _result(report.EVICTED, report.NO_HOST_TIER, *off, is_reference=True)]


def _result(workload: str, system: str, run: systems.Run, rss: systems.Rss, match_pct: float | None = None,
            is_reference: bool = False) -> SystemResult:
    return SystemResult(workload, system, len(run.outputs), sum(map(len, run.outputs)), run.wall_s, run.ttft_s,
                        rss.start_mib, rss.peak_mib, match_pct, is_reference, run.cached_tokens)


def _config(args: argparse.Namespace) -> BenchConfig:
    sizes = {key: default if getattr(args, key) is None else getattr(args, key)
             for key, default in (_QUICK if args.quick else _FULL).items()}
    if not 0 < sizes["min_prompt"] <= sizes["max_prompt"]:
        raise SystemExit("tandem bench engine: need 0 < --min-prompt <= --max-prompt")
    return BenchConfig(model=args.model, hf_batch_size=args.hf_batch_size or sizes["num_requests"],
                       user_tokens=_USER_TOKENS[args.quick], shared_output_tokens=_SHARED_OUTPUT_TOKENS[args.quick],
                       seed=args.seed, skip_hf=args.skip_hf, quick=args.quick,
                       json=args.json or "bench-results/engine.json", **sizes)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m cluster.bench.engine", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
