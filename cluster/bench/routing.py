"""`tandem bench routing`: Tandem's prefix-cache-aware router against the routers users know, on the same cluster
and the same requests, in one run.

Each router in turn gets a fresh Serve application (an ingress, N prefill replicas, one decode replica) and the
same generated workload:
- shared: S system prompts, U users on each, T turns per user. A turn's prompt is its system prompt, the user's
  conversation so far (messages and the model's answers) and a new message. Users arrive as a Poisson process
  (in random order of system prompt) and think for a random (exponential) time between turns.
- random: as many prompts of the same lengths with nothing in common (the negative control: no router can win
  by cache affinity, so throughput should not drop).

Per router: the prefill pool's prefix-cache hit rate from the engines' own counters, and its share of an
oracle's (a request's longest prefix shared with any earlier prompt, as if every replica held every block);
TTFT p50/p99 as the client sees it; output tokens per second; and load spread (the busiest prefill replica's
requests over the mean). Tandem's conditional disaggregation is off here, so every router routes every request.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.bench.machine import machine_info

ROUTERS = ("prefix-cache", "round-robin", "power-of-two", "prefix-tree", "sglang")
ARRIVAL_RATE = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="the model every replica runs")
    parser.add_argument("--prefill-replicas", type=int, default=4)
    parser.add_argument("--system-prompts", type=int, default=8, help="distinct system prompts (tenants)")
    parser.add_argument("--system-tokens", type=int, default=1024, help="tokens per system prompt")
    parser.add_argument("--users", type=int, default=3, help="users per system prompt")
    parser.add_argument("--turns", type=int, default=2, help="turns per user")
    parser.add_argument("--message-tokens", type=int, default=24, help="tokens per user message")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--arrival-rate", type=float, default=ARRIVAL_RATE,
                        help="new users per second (a Poisson process); 0: every user arrives at once")
    parser.add_argument("--think-s", type=float, default=2.0, help="mean pause between a user's turns, seconds")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    parser.add_argument("--workloads", nargs="+", default=["shared", "random"], choices=["shared", "random"])
    parser.add_argument("--num-cpus-per-rank", type=float, default=0.25)
    parser.add_argument("--kv-cache-gb", type=float, default=1.5,
                        help="KV cache per replica: the one decode replica must hold every prompt being decoded")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024,
                        help="each engine's per-step token budget (longer prompts prefill in chunks of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=VALUE",
                        help="a routing weight for Tandem's router (router/policy.py RoutingWeights), e.g. "
                             "queued_token=0.5; repeatable")
    parser.add_argument("--json", default="bench-results/routing.json", help="where to write the figures")


@dataclass
class Result:
    workload: str
    router: str
    requests: int
    hit_rate: float
    oracle_hit_rate: float
    ttft_p50_s: float
    ttft_p99_s: float
    output_tokens_per_s: float
    spread: float  # the busiest prefill replica's requests / the mean
    ttft_stages_mean_s: dict[str, float]  # where TTFT went on average (workers/engine/outputs.py TimeToFirstToken)

    @property
    def of_oracle(self) -> float:
        return self.hit_rate / self.oracle_hit_rate if self.oracle_hit_rate else float("nan")


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.redis_server import LocalRedis

    redis = LocalRedis()
    own_ray = not ray.is_initialized()  # a caller already connected to a Ray keeps it
    if own_ray:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    results = []
    try:
        for workload in args.workloads:
            for router in args.routers:
                print(f"bench routing: {workload} workload, {router} router ...", file=sys.stderr, flush=True)
                results.append(_run_one(args, workload, router, redis.url))
    finally:
        if own_ray:
            ray.shutdown()
        redis.stop()
    print(table(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(settings=vars(args), machine=machine_info(),
                                    results=[dict(vars(r), of_oracle=r.of_oracle) for r in results]), indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _run_one(args: argparse.Namespace, workload: str, router: str, redis_url: str) -> Result:
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ClusterConfig, PoolConfig
    from router.policy import RoutingWeights

    config = ClusterConfig(model=args.model, num_cpus_per_rank=args.num_cpus_per_rank,
                           kv_cache_memory_gb=args.kv_cache_gb, max_num_batched_tokens=args.max_num_batched_tokens,
                           prefill=PoolConfig(replicas=args.prefill_replicas, max_ongoing_requests=256),
                           decode=PoolConfig(max_ongoing_requests=256), prefill_router=router,
                           conditional_disaggregation=False, redis_url=redis_url,
                           routing=RoutingWeights(**_weights(args.weight)))
    ingress = serve.run(build_app(config), name="bench-routing", route_prefix=None)
    try:
        oracle, ttfts, stages, tokens, wall = asyncio.run(_drive(ingress, args, workload))
        time.sleep(1.5)  # the groups' load reports (with their counters) refresh every second
        counters = asyncio.run(_prefill_counters(redis_url))
    finally:
        serve.delete("bench-routing")
    prompt = sum(c["prompt_tokens"] for c in counters) or 1
    finished = [c["finished"] for c in counters]
    return Result(workload, router, len(ttfts), sum(c["cached_prompt_tokens"] for c in counters) / prompt,
                  oracle, _quantile(ttfts, 0.5), _quantile(ttfts, 0.99), tokens / wall,
                  max(finished) / statistics.mean(finished) if finished and sum(finished) else float("nan"),
                  {name: statistics.fmean(getattr(s, name) for s in stages) for name in _STAGES})


_STAGES = ("router_queue_s", "prefill_queue_s", "prefill_compute_s", "kv_transfer_s", "first_decode_step_s")


async def _drive(ingress, args: argparse.Namespace, workload: str) -> tuple[float, list[float], list, int, float]:
    """Runs every user's conversation; returns the oracle hit rate, TTFTs and their breakdowns, output tokens and
    wall time."""
    from router.ingress import GenerateRequest
    from workers.engine.sampling_params import SamplingParams
    from workers.kv.hashing import hash_full_blocks

    rng = random.Random(args.seed)
    vocab = 49152
    systems = [[rng.randrange(vocab) for _ in range(args.system_tokens)] for _ in range(args.system_prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    seen: set[bytes] = set()
    oracle = {"cached": 0, "prompt": 0}
    ttfts: list[float] = []
    stages = []
    produced = [0]

    async def user(system: list[int], arrival: float, user_rng: random.Random) -> None:
        history: list[int] = []
        await asyncio.sleep(arrival)
        for turn in range(args.turns):
            if turn:
                await asyncio.sleep(user_rng.expovariate(1 / args.think_s))
            message = [user_rng.randrange(vocab) for _ in range(args.message_tokens)]
            if workload == "shared":
                prompt = system + history + message
            else:  # the same length, nothing shared
                prompt = [user_rng.randrange(vocab) for _ in range(len(system) + len(history) + len(message))]
            hashes = hash_full_blocks(prompt, 16)[:(len(prompt) - 1) // 16]
            hit = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
            oracle["cached"] += hit * 16
            oracle["prompt"] += len(prompt)
            seen.update(hashes)
            start = time.perf_counter()
            first = None
            async for out in ingress.options(stream=True).generate.remote(GenerateRequest(prompt_token_ids=prompt,
                                                                                          params=params)):
                if first is None:
                    first = time.perf_counter()
                    stages.append(out.ttft)
                final = out
            ttfts.append(first - start)
            answer = final.outputs[0].token_ids
            produced[0] += len(answer)
            history += message + answer

    users = [system for system in systems for _ in range(args.users)]
    rng.shuffle(users)
    arrivals, at = [], 0.0
    for _ in users:
        arrivals.append(at)
        at += rng.expovariate(args.arrival_rate) if args.arrival_rate > 0 else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(user(system, arrival, random.Random(rng.random()))
                           for system, arrival in zip(users, arrivals)))
    return oracle["cached"] / max(oracle["prompt"], 1), ttfts, stages, produced[0], time.perf_counter() - start


async def _prefill_counters(redis_url: str) -> list[dict]:
    import redis.asyncio

    from workers.kv_events import KVKeys

    keys = KVKeys()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        groups = sorted(g.decode() for g in await client.smembers(keys.groups))
        reports = await client.mget([keys.load(g) for g in groups]) if groups else []
    finally:
        await client.aclose()
    loads = [json.loads(r) for r in reports if r is not None]
    return [load for load in loads if load["role"] == "prefill"]


def _weights(pairs: list[str]) -> dict[str, float]:
    weights = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--weight takes NAME=VALUE, got {pair!r}")
        weights[name] = float(value)
    return weights


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def table(results: list[Result]) -> str:
    lines = [f"{'workload':<8}  {'router':<13}  {'requests':>8}  {'hit %':>6}  {'of oracle':>9}  "
             f"{'TTFT p50 s':>10}  {'TTFT p99 s':>10}  {'out tok/s':>9}  {'spread':>6}"]
    for r in results:
        lines.append(f"{r.workload:<8}  {r.router:<13}  {r.requests:>8}  {r.hit_rate * 100:>6.1f}  "
                     f"{r.of_oracle * 100:>8.0f}%  {r.ttft_p50_s:>10.3f}  {r.ttft_p99_s:>10.3f}  "
                     f"{r.output_tokens_per_s:>9.1f}  {r.spread:>6.2f}")
    lines.append("")
    lines.append(f"{'mean TTFT by stage, s':<33}" + "".join(f"  {name.removesuffix('_s'):>17}" for name in _STAGES))
    for r in results:
        lines.append(f"{r.workload:<8}  {r.router:<23}" + "".join(f"  {r.ttft_stages_mean_s[name]:>17.3f}"
                                                           for name in _STAGES))
    lines.append("")
    by = {(r.workload, r.router): r for r in results}
    ours, rr, p2 = by.get(("shared", "prefix-cache")), by.get(("shared", "round-robin")), \
        by.get(("random", "power-of-two"))
    if ours and rr:
        lines.append(f"shared: TTFT p50 round-robin / ours {rr.ttft_p50_s / ours.ttft_p50_s:.2f}x (target >= 2x), "
                     f"throughput ours / round-robin {ours.output_tokens_per_s / rr.output_tokens_per_s:.2f}x "
                     "(target >= 1.5x)")
    if ours:
        lines.append(f"shared: hit rate {ours.of_oracle * 100:.0f}% of the oracle's (target >= 90%)")
    random_ours = by.get(("random", "prefix-cache"))
    if random_ours and p2:
        lines.append(f"random: throughput ours / power-of-two "
                     f"{random_ours.output_tokens_per_s / p2.output_tokens_per_s:.2f}x (target >= 0.95x)")
    return "\n".join(lines)
