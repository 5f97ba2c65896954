"""`tandem bench chaos`: the cluster under cancel storms and killed ranks (cluster/bench/faults.py), seen through
its public gRPC API, for more rounds than CI runs: exits 1 if any promise is broken."""

import argparse
import asyncio
import json
import os
import random
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path

from cluster.bench.machine import machine_info

APP = "bench-chaos"
KILL_STREAMS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="the model every group runs")
    parser.add_argument("--rounds", type=int, default=20, help="cancel-storm rounds")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams per round")
    parser.add_argument("--long-streams", type=int, default=10, help="of those, how many are long")
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks per group; at 2 or more the kill takes a follower rank of the decode group")
    parser.add_argument("--decode-replicas", type=int, default=2,
                        help="decode groups: with 2 or more, the streams of the killed one move to another and "
                             "complete with their exact tokens; with 1 they end UNAVAILABLE")
    parser.add_argument("--num-cpus-per-rank", type=float, default=0.5)
    parser.add_argument("--step-timeout-s", type=float, default=60.0,
                        help="the cluster's step_timeout_s (its default): how long the hung decode rank holds its "
                             "streams before its replica ends the group; above kv_transfer_timeout_s (30 s)")
    parser.add_argument("--grpc-port", type=int, default=50151)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-results/chaos.json", help="where to write the figures")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.bench.faults import KILL_WITHIN_S, kill_under_load, prompt_set, unfaulted_s
    from cluster.config import ClusterConfig, PoolConfig
    from cluster.redis_server import LocalRedis
    from workers.engine.llm import LLM
    from workers.engine.sampling_params import SamplingParams

    rng = random.Random(args.seed)
    config = ClusterConfig(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                           num_cpus_per_rank=args.num_cpus_per_rank, grpc_port=args.grpc_port,
                           step_timeout_s=args.step_timeout_s,
                           prefill=PoolConfig(max_ongoing_requests=256),
                           decode=PoolConfig(replicas=args.decode_replicas, max_ongoing_requests=256))
    log(f"reference: greedy tokens of {args.model} offline")
    llm = LLM(config.model, progress=False)
    prompts = prompt_set(rng, llm.engine.vocab_size)
    greedy = SamplingParams(max_tokens=args.long_tokens, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    del llm
    redis = LocalRedis()
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    target = f"127.0.0.1:{args.grpc_port}"
    try:
        serve.run(build_app(replace(config, redis_url=redis.url)), name=APP, route_prefix=None)
        rounds = asyncio.run(_storm(args, target, prompts, expected, rng))
        kills = []
        # A hung rank holds its streams until the stall watch ends its group (polled every 2 s), then they move.
        hang_within_s = args.step_timeout_s + 2 + KILL_WITHIN_S
        for pool, rank, sig, within_s in (("decode", args.tensor_parallel_size - 1, signal.SIGKILL, KILL_WITHIN_S),
                                          ("prefill", 0, signal.SIGKILL, KILL_WITHIN_S),
                                          ("decode", 0, signal.SIGSTOP, hang_within_s)):
            what = "killing" if sig == signal.SIGKILL else "hanging (SIGSTOP)"
            log(f"the same streams without a fault, then {what} rank {rank} of the {pool} group under them")
            unfaulted = asyncio.run(unfaulted_s(target, prompts, KILL_STREAMS, args.long_tokens))
            kill = asdict(asyncio.run(kill_under_load(target, pool, rank, prompts, expected, KILL_STREAMS,
                                                      args.long_tokens, sig=sig, within_s=within_s)))
            kills.append(dict(kill, unfaulted_end_s=unfaulted - kill["killed_after_s"]))
        serve.delete(APP)  # gracefully; ray.shutdown then takes Serve's controller without killing its calls
    finally:
        ray.shutdown()
        redis.stop()
    print(table(rounds, kills))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(settings=vars(args), machine=machine_info(), rounds=rounds, kills=kills),
                               indent=2) + "\n")
    log(f"wrote {path}")
    failed = any(r["wrong"] or r["leaks"] for r in rounds) or any(
        k["other"] or k["slowest_end_s"] > k["within_s"] for k in kills)
    return 1 if failed else 0


async def _storm(args, target: str, prompts, expected, rng: random.Random) -> list[dict]:
    from cluster.bench.faults import (
        HOW,
        Stream,
        idle_stats,
        leaks,
        plan_round,
        run_stream_at,
        storm_round,
        wrong_outputs,
    )

    first = await run_stream_at(target, Stream(0, 1, "finish"), prompts[0])
    first_token_s = max(0.05, first)
    rounds = []
    for i in range(args.rounds):
        plan = plan_round(rng, len(prompts), args.streams, args.long_streams, args.short_tokens, args.long_tokens,
                          first_token_s * 4)
        outcomes = await storm_round(target, prompts, plan)
        stats = await idle_stats()
        rounds.append(dict(round=i, streams=len(plan), wrong=len(wrong_outputs(outcomes, expected)),
                           leaks=leaks(stats), cancelled={how: sum(o.stream.how == how for o in outcomes)
                                                          for how in HOW[1:]}))
        log(f"round {i}: {rounds[-1]['wrong']} wrong outputs, leaks: {rounds[-1]['leaks'] or 'none'}")
    return rounds


def table(rounds: list[dict], kills: list[dict]) -> str:
    streams = sum(r["streams"] for r in rounds)
    cancelled = {how: sum(r["cancelled"][how] for r in rounds) for how in rounds[0]["cancelled"]} if rounds else {}
    lines = ["| cancel storm | value |", "| --- | --- |",
             f"| rounds x streams | {len(rounds)} x {streams // max(1, len(rounds))} |",
             *(f"| cancelled: {how.replace('_', ' ')} | {n} |" for how, n in cancelled.items()),
             f"| finished streams with wrong tokens | {sum(r['wrong'] for r in rounds)} |",
             f"| rounds leaving anything held | {sum(bool(r['leaks']) for r in rounds)} |", "",
             "| rank | in flight | exact | UNAVAILABLE | other | last ended after the fault | without the fault | "
             "new requests served after | group replaced after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k['pool']} rank {k['rank']} {k['fault']} | {k['in_flight']} | {k['completed']} | "
              f"{k['unavailable']} | {len(k['other'])} | {k['slowest_end_s']:.1f} s (limit {k['within_s']:.0f} s) | "
              f"{k['unfaulted_end_s']:.1f} s | {k['recovered_s']:.1f} s | {k['replaced_s']:.1f} s |" for k in kills]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"bench chaos: {message}", file=sys.stderr, flush=True)
