"""`tandem bench soak --minutes N`: the cluster at steady load for a long time, watched for leaks.

A closed loop of clients (each sends its next request when the last one ends) on a shared-prefix workload (a few
system prompts, a new user message each time) through the gRPC API, for N minutes. Every 15 s: the resident
memory of each of the cluster's processes (Serve's controller and HTTP proxy, the ingress with its request
routers and KV index, the pool replicas and their rank processes), each pool's free KV blocks and the size of the
ingress's KV-block index. Reported: each process's memory slope after warm-up (target < 1 MB/min), the index's
size over the run (it must stay bounded), and the free blocks once the load stops against the idle baseline (the
prefix cache's blocks count as free: they are evictable).
"""

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.bench.machine import machine_info

APP = "bench-soak"
RSS_SLOPE_TARGET_MB_PER_MIN = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="the model every group runs")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="memory slopes start after this (default: a third of the run, at most 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each with one request at a time")
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--message-tokens", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--num-kv-blocks", type=int, default=512,
                        help="KV blocks per group: small, so the prefix cache fills and evicts early in the run and "
                             "the index reaches its bound")
    parser.add_argument("--num-cpus-per-rank", type=float, default=0.5)
    parser.add_argument("--grpc-port", type=int, default=50161)
    parser.add_argument("--http-port", type=int, default=8161)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench-results/soak.json", help="where to write the figures")


@dataclass
class Sample:
    t_min: float  # minutes since the load started
    rss_mb: dict[str, float]  # process label -> resident memory, MB
    free_blocks: dict[str, int]  # pool -> free KV blocks
    index_blocks: float  # block hashes in the ingress's KV index


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    total_blocks: dict[str, int] = field(default_factory=dict)
    idle_free_blocks: dict[str, int] = field(default_factory=dict)  # after the load stopped


def cluster_processes(app: str) -> dict[str, int]:
    """Label -> pid of every process of Serve and of the app: found by Ray's actor names."""
    import ray

    from workers.group import RANK_ACTOR_PREFIX

    labels = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(RANK_ACTOR_PREFIX):
            pool, _, rank = name[len(RANK_ACTOR_PREFIX):].split(":")
            label = f"{pool} rank {rank}"
        elif name.startswith(f"SERVE_REPLICA::{app}#"):
            label = f"{name.split('#')[1]} replica"
        elif name.startswith("SERVE_CONTROLLER"):
            label = "serve controller"
        elif name.startswith("SERVE_PROXY"):
            label = "serve http proxy"
        else:
            continue
        handle = ray.get_actor(name, namespace=actor["namespace"])
        labels[_unique(labels, label)] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()))
    return labels


def _unique(taken: dict, label: str) -> str:
    n, candidate = 1, label
    while candidate in taken:
        n += 1
        candidate = f"{label} {n}"
    return candidate


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, value) points; 0 with fewer than two."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ClusterConfig
    from cluster.redis_server import LocalRedis

    redis = LocalRedis()
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        config = ClusterConfig(model=args.model, num_cpus_per_rank=args.num_cpus_per_rank, redis_url=redis.url,
                               num_kv_blocks=args.num_kv_blocks, grpc_port=args.grpc_port, http_port=args.http_port)
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        serve.run(build_app(config), name=APP, route_prefix="/")
        processes = cluster_processes(APP)
        log(f"watching {len(processes)} processes: {', '.join(sorted(processes))}")
        soak = asyncio.run(_soak(args, processes))
        serve.delete(APP)  # gracefully; ray.shutdown then takes Serve's controller without killing its calls
    finally:
        ray.shutdown()
        redis.stop()
    warmup = args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 3)
    report = summarize(soak, warmup)
    print(table(report))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(settings=vars(args), machine=machine_info(), report=report,
                                    samples=[vars(s) for s in soak.samples]), indent=2) + "\n")
    log(f"wrote {path}")
    return 0


async def _soak(args: argparse.Namespace, processes: dict[str, int]) -> Soak:
    import grpc
    import psutil
    from ray import serve

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc

    rng = random.Random(args.seed)
    systems = [[rng.randrange(1000, 40000) for _ in range(args.system_tokens)] for _ in range(args.system_prompts)]
    pools = ("prefill", "decode")
    handles = {pool: serve.get_deployment_handle(pool, app_name=APP) for pool in pools}
    soak = Soak()
    for pool, handle in handles.items():
        soak.total_blocks[pool] = (await handle.stats.remote()).num_blocks
    started = time.monotonic()
    stop_at = started + args.minutes * 60

    async def client(channel, client_rng: random.Random) -> None:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        while time.monotonic() < stop_at:
            prompt = client_rng.choice(systems) + [client_rng.randrange(1000, 40000)
                                                   for _ in range(args.message_tokens)]
            try:
                async for _ in stub.Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=prompt),
                        sampling=pb.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)), timeout=120):
                    pass
                soak.requests += 1
            except grpc.aio.AioRpcError as e:
                soak.errors[e.code().name] = soak.errors.get(e.code().name, 0) + 1

    async def sample() -> None:
        rss = {}
        for label, pid in processes.items():
            try:
                rss[label] = psutil.Process(pid).memory_info().rss / 1e6
            except psutil.NoSuchProcess:
                rss[label] = float("nan")
        free = {pool: (await handle.stats.remote()).num_free_blocks for pool, handle in handles.items()}
        index = await asyncio.to_thread(_index_blocks, args.http_port)
        soak.samples.append(Sample((time.monotonic() - started) / 60, rss, free, index))
        log(f"{soak.samples[-1].t_min:5.1f} min: {soak.requests} requests, index {index:.0f} blocks, free {free}")

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            await sample()
            await asyncio.sleep(min(args.sample_s, max(0.0, stop_at - time.monotonic())))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        await asyncio.gather(sampler(), *(client(channel, random.Random(rng.random()))
                                         for _ in range(args.concurrency)))
    await sample()
    await asyncio.sleep(5)  # let the last aborts and lease releases land
    soak.idle_free_blocks = {pool: (await handle.stats.remote()).num_free_blocks for pool, handle in handles.items()}
    return soak


def _index_blocks(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^tandem_router_index_blocks (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


def summarize(soak: Soak, warmup_min: float) -> dict:
    after = [s for s in soak.samples if s.t_min >= warmup_min]
    labels = sorted(soak.samples[0].rss_mb) if soak.samples else []
    processes = {label: dict(rss_start_mb=soak.samples[0].rss_mb[label], rss_end_mb=soak.samples[-1].rss_mb[label],
                             slope_mb_per_min=slope_per_min([(s.t_min, s.rss_mb[label]) for s in after]))
                 for label in labels}
    index = [s.index_blocks for s in soak.samples]
    return dict(minutes=soak.samples[-1].t_min if soak.samples else 0.0, warmup_minutes=warmup_min,
                requests=soak.requests, errors=soak.errors, processes=processes,
                index_blocks_max=max(index, default=0.0), index_blocks_end=index[-1] if index else 0.0,
                index_slope_per_min=slope_per_min([(s.t_min, s.index_blocks) for s in after]),
                total_blocks=soak.total_blocks, idle_free_blocks=soak.idle_free_blocks)


def table(report: dict) -> str:
    lines = [f"soak: {report['minutes']:.1f} min, {report['requests']} requests, errors {report['errors'] or 'none'}",
             "", "| process | RSS start (MB) | RSS end (MB) | slope after warm-up (MB/min) | target < 1 |",
             "| --- | --- | --- | --- | --- |"]
    for label, p in report["processes"].items():
        ok = "yes" if p["slope_mb_per_min"] < RSS_SLOPE_TARGET_MB_PER_MIN else "NO"
        lines.append(f"| {label} | {p['rss_start_mb']:.0f} | {p['rss_end_mb']:.0f} | {p['slope_mb_per_min']:.2f} | "
                     f"{ok} |")
    lines += ["", "| KV | value |", "| --- | --- |",
              f"| index blocks: max / at the end | {report['index_blocks_max']:.0f} / "
              f"{report['index_blocks_end']:.0f} |",
              f"| index slope after warm-up (blocks/min) | {report['index_slope_per_min']:.1f} |",
              *(f"| {pool} free blocks idle after the run / total | {report['idle_free_blocks'].get(pool)} / {total} |"
                for pool, total in report["total_blocks"].items())]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"bench soak: {message}", file=sys.stderr, flush=True)
