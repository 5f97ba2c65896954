"""Faults caused from outside the cluster, through its public gRPC API: cancel storms and killed ranks.

Cancel storm: rounds of concurrent streams (a few long ones), each either left to finish or ended at one phase
of its life: at once (still queued), at a random moment before its first token (queued, prefilling or in KV
transfer), while decoding, after its last token, or by closing its connection. Streams left to finish must
return exactly the greedy tokens of the same prompt; after each round every pool must be idle with every block
free (the prefix cache's blocks count as free: they are evictable), nothing pinned for a transfer and nothing
being received. KV channels stay open between rounds by design (one per rank pair, reused).

Rank kill: SIGKILL one rank of the pool's busiest group while streams run. Every stream must end within the
health-check period + 10 s, with its exact tokens or UNAVAILABLE, and new requests sent meanwhile succeed; Serve
then replaces the group, and the next fault starts on a whole cluster. The ingress moves a lost decode group's
streams to another decode group, so where the pool has one, they all complete with their exact tokens. A hang is
SIGSTOP instead: the rank neither answers nor dies until its replica ends the group after step_timeout_s
(workers/stall_watch.py), and the promise is that much longer.

`tandem bench chaos` (cluster/bench/chaos.py) and the CI tests (tests/cluster/test_chaos.py) run this code, the
tests with fewer rounds.
"""

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc

HOW = ("finish", "queued", "before_first_token", "decoding", "after_last_token", "disconnect")
HEALTH_CHECK_PERIOD_S = 10  # cluster/app.py's health_check_period_s for the pools
KILL_WITHIN_S = HEALTH_CHECK_PERIOD_S + 10  # the promise: every stream a killed rank held ends within this


@dataclass(frozen=True)
class Stream:
    prompt: int  # index into the round's prompts
    max_tokens: int
    how: str  # one of HOW
    delay_s: float = 0.0  # before_first_token / disconnect: when the client leaves, from the call's start
    after_tokens: int = 0  # decoding: how many tokens it reads before leaving


@dataclass
class Outcome:
    stream: Stream
    status: str  # the gRPC status name the client saw, "OK" for a complete stream
    token_ids: list[int]
    ended_at: float = 0.0  # time.monotonic() when the stream ended
    detail: str = ""  # the status message, when there is one


def plan_round(rng: random.Random, num_prompts: int, streams: int, long_streams: int, short_tokens: int,
               long_tokens: int, first_token_s: float) -> list[Stream]:
    """Half the streams finish; the other half are cancelled, spread evenly over the phases."""
    plan = []
    for i in range(streams):
        max_tokens = long_tokens if i < long_streams else short_tokens
        how = "finish" if i % 2 == 0 else HOW[1 + (i // 2) % (len(HOW) - 1)]
        plan.append(Stream(rng.randrange(num_prompts), max_tokens, how, rng.uniform(0, first_token_s),
                           rng.randrange(1, max_tokens)))
    rng.shuffle(plan)
    return plan


async def run_stream(stub, stream: Stream, prompt: list[int]) -> Outcome:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
        max_tokens=stream.max_tokens, temperature=0.0, ignore_eos=True))
    call = stub.Generate(request, timeout=300)
    tokens: list[int] = []
    detail = ""
    try:
        if stream.how == "queued":
            await asyncio.sleep(0)
            call.cancel()
        elif stream.how == "before_first_token":
            await asyncio.sleep(stream.delay_s)
            call.cancel()
        async for response in call:
            tokens.extend(response.token_ids)
            if stream.how == "decoding" and len(tokens) >= stream.after_tokens:
                call.cancel()
        if stream.how == "after_last_token":
            call.cancel()  # too late to change anything: the stream is complete
        status = "OK"
    except asyncio.CancelledError:
        status = "CANCELLED"
    except grpc.aio.AioRpcError as e:
        status, detail = e.code().name, e.details() or ""
    return Outcome(stream, status, tokens, time.monotonic(), detail)


async def run_disconnecting_stream(target: str, stream: Stream, prompt: list[int]) -> Outcome:
    """The client's connection goes away under the stream, as when its process dies."""
    channel = grpc.aio.insecure_channel(target)
    task = asyncio.create_task(run_stream(tandem_pb2_grpc.GenerationStub(channel), stream, prompt))
    await asyncio.sleep(stream.delay_s)
    await channel.close(grace=None)
    outcome = await task
    outcome.status = "CANCELLED" if outcome.status != "OK" else outcome.status
    return outcome


async def storm_round(target: str, prompts: list[list[int]], plan: list[Stream]) -> list[Outcome]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        return await asyncio.gather(*(
            run_disconnecting_stream(target, s, prompts[s.prompt]) if s.how == "disconnect"
            else run_stream(stub, s, prompts[s.prompt]) for s in plan))


def wrong_outputs(outcomes: list[Outcome], expected: list[list[int]]) -> list[Outcome]:
    """Streams that were not cancelled but did not return exactly the greedy tokens they asked for."""
    return [o for o in outcomes if o.stream.how in ("finish", "after_last_token")
            and (o.status != "OK" or o.token_ids != expected[o.stream.prompt][:o.stream.max_tokens])]


async def idle_stats(timeout_s: float = 15.0) -> dict:
    """Every group's stats (by "pool group id") once all are idle with every block free, or whatever they are at
    the timeout. A group with a killed rank may answer with an error until Serve has replaced it: that is retried
    too.

    The timeout outlasts the prefill groups' claim window (kv_claim_s, 5 s): a stream cancelled while Serve is
    handing its prefill call to a replica can still be prefilled there, with no one to claim the handoff, and its
    blocks stay pinned until the window ends (the ingress cannot release what it never received)."""
    from ray.exceptions import RayError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stats = {f"{r.pool} {r.group}": await r.handle.stats.remote() for r in rank_actors() if r.rank == 0}
        except RayError:
            if time.monotonic() > deadline:
                raise
        else:
            if not leaks(stats) or time.monotonic() > deadline:
                return stats
        await asyncio.sleep(0.2)


def leaks(stats: dict) -> list[str]:
    """What a pool still holds that an idle pool must not: requests, pinned or arriving KV, used blocks."""
    found = []
    for name, s in stats.items():
        held = dict(running=s.num_running, waiting=s.num_waiting, pinned=s.num_pinned, receiving=s.num_receiving,
                    used_blocks=s.num_blocks - s.num_free_blocks)
        found += [f"{name}: {what}={n}" for what, n in held.items() if n]
    return found


@dataclass(frozen=True)
class RankActor:
    pool: str
    group: str  # the pool replica's id
    rank: int
    handle: Any


@dataclass(frozen=True)
class Rank:
    pool: str
    group: str
    rank: int
    pid: int
    num_running: int  # the group's running requests, from its rank 0


def rank_actors() -> list[RankActor]:
    """The live ranks of the pools' groups, found by their actor names (workers/group.py)."""
    import ray

    from workers.group import RANK_ACTOR_PREFIX

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(RANK_ACTOR_PREFIX):
            pool, group, rank = actor["name"][len(RANK_ACTOR_PREFIX):].split(":")
            found.append(RankActor(pool, group, int(rank), ray.get_actor(actor["name"],
                                                                         namespace=actor["namespace"])))
    return found


def rank_processes() -> list[Rank]:
    """The rank processes of the pools' groups that serve, the busiest groups first."""
    import ray

    actors = rank_actors()
    running = _serving(actors)
    ranks = [Rank(a.pool, a.group, a.rank, ray.get(a.handle.__ray_call__.remote(lambda _: os.getpid())),
                  running[a.pool, a.group]) for a in actors if (a.pool, a.group) in running]
    return sorted(ranks, key=lambda r: -r.num_running)


def _serving(actors: list[RankActor]) -> dict[tuple[str, str], int]:
    """The running requests of each (pool, group) that serves: its rank 0 answers its health check (not a group
    still starting, nor one that lost a rank)."""
    import ray

    running = {}
    for a in actors:
        if a.rank == 0:
            try:
                running[a.pool, a.group] = ray.get(a.handle.check_health.remote()).num_running
            except ray.exceptions.RayError:
                pass
    return running


def serving_groups(pool: str) -> set[str]:
    return {group for p, group in _serving(rank_actors()) if p == pool}


@dataclass
class KillResult:
    pool: str
    rank: int
    fault: str  # "killed" (SIGKILL) or "hung" (SIGSTOP: the rank neither answers nor dies)
    in_flight: int  # streams running when the rank was killed
    completed: int  # of those, ended with their exact tokens
    unavailable: int  # of those, ended with UNAVAILABLE
    other: list[str] = field(default_factory=list)  # any other ending (a failure of the promise)
    slowest_end_s: float = 0.0  # the last of them to end, seconds after the kill
    killed_after_s: float = 0.0  # the kill, seconds after the streams started
    within_s: float = KILL_WITHIN_S  # the promise: every one ends within this
    recovered_s: float = float("nan")  # until a request sent after the kill first succeeded with its exact tokens
    replaced_s: float = float("nan")  # until the pool had as many groups serving as before, the victim's not one


async def kill_under_load(target: str, pool: str, rank: int, prompts: list[list[int]], expected: list[list[int]],
                          streams: int, max_tokens: int, recover_timeout_s: float = 120.0,
                          sig: signal.Signals = signal.SIGKILL,
                          within_s: float = KILL_WITHIN_S) -> KillResult:
    """Kills `rank` of the pool's group that runs the most streams, a second after they start; with SIGSTOP it
    hangs there instead, until its replica ends the group (step_timeout_s), which `within_s` must allow for."""
    plan = _kill_plan(len(prompts), streams, max_tokens)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        started = time.monotonic()
        running = [asyncio.create_task(run_stream(stub, s, prompts[s.prompt])) for s in plan]
        await asyncio.sleep(1.0)
        ranks = await asyncio.to_thread(rank_processes)
        victim = next(r for r in ranks if (r.pool, r.rank) == (pool, rank))
        num_groups = len({r.group for r in ranks if r.pool == pool})
        killed = time.monotonic()
        os.kill(victim.pid, sig)
        serving = asyncio.create_task(_serving_again(stub, prompts[0], expected[0][:4], killed, recover_timeout_s))
        replaced = asyncio.create_task(_replaced(victim, num_groups, killed, recover_timeout_s))
        outcomes = await asyncio.wait_for(asyncio.gather(*running), within_s + 60)
        result = KillResult(victim.pool, victim.rank, "hung" if sig == signal.SIGSTOP else "killed", len(outcomes),
                            0, 0, killed_after_s=killed - started, within_s=within_s)
        for o in outcomes:
            if o.status == "OK" and o.token_ids == expected[o.stream.prompt][:max_tokens]:
                result.completed += 1
            elif o.status == "UNAVAILABLE":
                result.unavailable += 1
            else:
                result.other.append(f"{o.status} after {len(o.token_ids)} tokens: {o.detail}")
        result.slowest_end_s = max(o.ended_at for o in outcomes) - killed
        result.recovered_s = await serving
        result.replaced_s = await replaced
    return result


async def unfaulted_s(target: str, prompts: list[list[int]], streams: int, max_tokens: int) -> float:
    """Seconds the streams `kill_under_load` runs take on the whole cluster, from their start to the last one's
    end: what a kill's streams would have taken without it, on this machine."""
    plan = _kill_plan(len(prompts), streams, max_tokens)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(run_stream(stub, s, prompts[s.prompt]) for s in plan))
    return max(o.ended_at for o in outcomes) - started


def _kill_plan(num_prompts: int, streams: int, max_tokens: int) -> list[Stream]:
    return [Stream(i % num_prompts, max_tokens, "finish") for i in range(streams)]


async def _replaced(victim: Rank, num_groups: int, since: float, timeout_s: float) -> float:
    """Seconds from `since` until `num_groups` groups of the victim's pool serve again, the victim's not among
    them; nan if not within `timeout_s`."""
    while time.monotonic() - since < timeout_s:
        serving = await asyncio.to_thread(serving_groups, victim.pool)
        if victim.group not in serving and len(serving) >= num_groups:
            return time.monotonic() - since
        await asyncio.sleep(0.5)
    return float("nan")


async def _serving_again(stub, prompt: list[int], expected: list[int], since: float, timeout_s: float) -> float:
    """Seconds from `since` until a new request (one short stream sent each second beside those in flight, none
    waiting for another: one sent to a hung group must not hold up the next) ends with its exact tokens; nan if
    none does within `timeout_s`."""
    served = asyncio.Event()
    first = float("nan")

    async def probe() -> None:
        nonlocal first
        outcome = await run_stream(stub, Stream(0, len(expected), "finish"), prompt)
        if outcome.status == "OK" and outcome.token_ids == expected and not served.is_set():
            first = time.monotonic() - since
            served.set()

    probes = []
    while time.monotonic() - since < timeout_s and not served.is_set():
        probes.append(asyncio.create_task(probe()))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(served.wait(), 1.0)
    for task in probes:
        task.cancel()
    await asyncio.gather(*probes, return_exceptions=True)
    return first


def prompt_set(rng: random.Random, vocab_size: int, count: int = 16) -> list[list[int]]:
    """Prompts of 20 to 150 tokens, half of them behind one shared 64-token prefix so the prefix cache and the
    partial transfers take part."""
    shared = [rng.randrange(vocab_size) for _ in range(64)]
    return [(shared if i % 2 else []) + [rng.randrange(vocab_size) for _ in range(rng.randrange(20, 90))]
            for i in range(count)]


async def run_stream_at(target: str, stream: Stream, prompt: list[int]) -> float:
    """Seconds one stream takes on the idle cluster: the scale of the storm's before-first-token delays."""
    async with grpc.aio.insecure_channel(target) as channel:
        started = time.monotonic()
        await run_stream(tandem_pb2_grpc.GenerationStub(channel), stream, prompt)
        return time.monotonic() - started
