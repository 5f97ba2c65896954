"""Resizing a pool under prefix-aware routing: a replica added mid-run takes its share of the work without giving
up the cache, and a replica taken away first hands the prefixes only it holds to the survivors.

Users of llm-d report that a replica added under a prefix-aware router serves ~1% of the traffic: the router
sends every prefix to the replica that holds it, and the new one holds none. Tandem's cost weighs a prefix
exactly as the compute it saves, against the load already queued and running on its holder, so once the old
replica is loaded past what a prefix saves, the new one gets requests, computes each prefix once, and from then on
competes on load alone.

A real Ray, Serve and redis-server; a unified cluster (each replica prefills its own requests) on the tiny Llama
model. One replica serves a shared-prefix workload (4 system prompts of 384 tokens, users with 16 tokens of their
own) and sets the single-replica hit rate; then the pool grows to two replicas mid-run and the same workload,
with 480 new users at a concurrency that loads one replica past what a prefix saves (96 requests in flight; at 8,
the old replica is not, and the new one rightly gets nothing), runs for at most 2 minutes. The figures come from the
groups' own counters (their load reports in Redis). Measured on a 2-core machine: the new replica served 48-51% of
the prompt tokens (44% with two busy loops taking the same cores), and the hit rate was 1.08x the single-replica
value (each system prompt is computed once more, on the new replica, over many more requests). With 240 users the
run lasted a few seconds and its start (the first 48 requests on the old replica, the new one computing each
system prompt) weighed on the share: 36-55%, and 29.6% once in CI.

On scale-down Serve picks the replica that goes; Tandem cannot choose it (ray-project/ray#33056), so the one
picked hands its unique prefixes on before it stops (workers/prefix_handoff.py): the survivor then answers the
gone replica's prompts from its cache.
"""

import asyncio
import random
import re
import time
from pathlib import Path

import pytest
import ray
import redis
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from cluster.config import ClusterConfig, PoolConfig
from cluster.deploy import deploy
from cluster.serve_config import APP_NAME, render_serve_config
from router.ingress import GenerateRequest
from router.load_view import LoadView
from workers.engine.sampling_params import SamplingParams
from workers.kv.hashing import hash_full_blocks
from workers.kv_events import KVKeys

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

PREFIXES = [[(97 * p + 13 * j) % 49152 for j in range(384)] for p in range(4)]
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def config(model: str, redis_url: str, replicas: int = 1) -> ClusterConfig:
    return ClusterConfig(model=model, disaggregate=False, num_kv_blocks=512, num_cpus_per_rank=0.5,
                         redis_url=redis_url, grpc_port=16085, decode=PoolConfig(replicas=replicas))


def scale_decode_pool(cluster: ClusterConfig, replicas: int) -> None:
    """What an operator does with `serve deploy`: the same Serve config with the decode deployment's num_replicas
    overridden, which Serve applies in place (a replica added, the running one kept)."""
    schema = render_serve_config(cluster)
    schema["applications"][0]["deployments"] = [{"name": "decode", "num_replicas": replicas}]
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(schema))
    deadline = time.monotonic() + 120
    while not (len(decode_replicas()) == replicas
               and serve.status().applications[APP_NAME].status == ApplicationStatus.RUNNING
               and ingress_sees(replicas)):
        assert time.monotonic() < deadline, f"the pool did not reach {replicas} replicas"
        time.sleep(0.5)


def ingress_sees(replicas: int) -> bool:
    """Whether the ingress's decode handle has heard of the new replica set yet: Serve's controller reports it
    running before the update reaches the handles, and until then every request goes to the replicas they know.
    The handle logs each update it gets in the ingress replica's log."""
    [ingress] = replica_ids("ingress")
    log = serve_logs() / f"replica_{APP_NAME}_ingress_{ingress}.log"
    updates = re.findall(r"Got updated replicas for Deployment\(name='decode', app='" + APP_NAME + r"'\): (\d+) total",
                         log.read_text() if log.exists() else "")
    return bool(updates) and int(updates[-1]) == replicas


def replica_ids(deployment: str) -> set[str]:
    """The deployment's live replicas' unique ids (for a pool, the ids its groups report under)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return {n["name"].rsplit("#", 1)[-1] for n in names
            if n["name"].startswith("SERVE_REPLICA") and f"{APP_NAME}#{deployment}#" in n["name"]}


def decode_replicas() -> set[str]:
    return replica_ids("decode")


def serve_logs() -> Path:
    return Path(ray._private.worker._global_node.get_logs_dir_path(), "serve")


async def counters(redis_url: str, groups: set[str]) -> dict[str, tuple[int, int, int]]:
    """Each group's (finished requests, prompt tokens, cached prompt tokens) as it last reported them."""
    view = LoadView(redis_url)
    try:
        reports = await view.reports()
    finally:
        await view.close()
    return {g: (r["finished"], r["prompt_tokens"], r["cached_prompt_tokens"])
            for g, r in reports.items() if g in groups}


async def run_users(ingress, num_users: int, concurrency: int, seed: int, deadline: float) -> int:
    """Sends num_users requests (a random system prompt + 16 tokens of the user's own), `concurrency` at a time,
    until the deadline; returns how many were sent. Every one must finish with all its tokens."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    sent = 0

    async def user(prompt: list[int]) -> None:
        nonlocal sent
        async with gate:
            if time.monotonic() > deadline:
                return
            sent += 1
            outs = [o async for o in ingress.options(stream=True).generate.remote(
                GenerateRequest(prompt_token_ids=prompt, params=PARAMS))]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == PARAMS.max_tokens

    prompts = [rng.choice(PREFIXES) + [rng.randrange(49152) for _ in range(16)] for _ in range(num_users)]
    await asyncio.gather(*(user(p) for p in prompts))
    return sent


async def settled(redis_url: str, groups: set[str], before: dict, expected: int) -> dict:
    """The counters once the groups have reported all `expected` requests finished since `before`."""
    deadline = time.monotonic() + 30
    while True:
        now = await counters(redis_url, groups)
        if sum(now.get(g, (0,))[0] - before.get(g, (0, 0, 0))[0] for g in groups) >= expected:
            return now
        assert time.monotonic() < deadline, f"reports never caught up: {now} after {before}"
        await asyncio.sleep(0.5)


def delta(after: dict, before: dict, group: str) -> tuple[int, int]:
    """(prompt tokens, cached prompt tokens) the group served between two readings."""
    start = before.get(group, (0, 0, 0))
    return after[group][1] - start[1], after[group][2] - start[2]


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def test_a_replica_added_mid_run_serves_its_share_and_the_hit_rate_holds(model, redis_url):
    cluster = config(model, redis_url)
    deploy(cluster, timeout_s=300)
    try:
        ingress = serve.get_app_handle(APP_NAME)
        [old] = decode_replicas()

        async def single_replica() -> float:
            before = await counters(redis_url, {old})
            sent = await run_users(ingress, 48, 8, seed=1, deadline=float("inf"))
            after = await settled(redis_url, {old}, before, sent)
            prompt, cached = delta(after, before, old)
            return cached / prompt

        single_hit = asyncio.run(single_replica())

        scale_decode_pool(cluster, 2)
        [new] = decode_replicas() - {old}
        assert decode_replicas() == {old, new}

        async def two_replicas() -> tuple[float, float]:
            groups = {old, new}
            before = await counters(redis_url, groups)
            sent = await run_users(ingress, 480, 96, seed=2, deadline=time.monotonic() + 120)
            after = await settled(redis_url, groups, before, sent)
            (old_prompt, old_cached), (new_prompt, new_cached) = delta(after, before, old), delta(after, before, new)
            return new_prompt / (old_prompt + new_prompt), (old_cached + new_cached) / (old_prompt + new_prompt)

        new_share, hit = asyncio.run(two_replicas())
        print(f"single-replica hit rate {single_hit:.3f}; with the added replica: its share of prompt tokens "
              f"{new_share:.3f}, hit rate {hit:.3f} ({hit / single_hit:.2f} of the single-replica value)")
        assert new_share >= 0.30
        assert hit >= 0.80 * single_hit
    finally:
        serve.delete(APP_NAME)


def block_sets(redis_url: str, groups: set[str]) -> dict[str, set[bytes]]:
    """The block hashes each group holds, as the routers' index sees them."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {g: client.smembers(KVKeys().blocks(g)) for g in groups}
    finally:
        client.close()


def eventually(condition, what: str, timeout_s: float = 30.0):
    """Polls `condition` until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return value


def cached_tokens(ingress, prompts: list[list[int]], params: SamplingParams = PARAMS) -> list[int]:
    """Sends every prompt at once; each must finish with all its tokens. Returns the prompt tokens each one took
    from the prefix cache."""
    async def one(prompt: list[int]) -> int:
        outs = [o async for o in ingress.options(stream=True).generate.remote(
            GenerateRequest(prompt_token_ids=prompt, params=params))]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == params.max_tokens
        return outs[-1].num_cached_tokens

    async def run() -> list[int]:
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(run())


def test_a_replica_scaled_away_hands_its_unique_prefixes_to_the_survivor(model, redis_url):
    cluster = config(model, redis_url, replicas=2)
    deploy(cluster, timeout_s=300)
    try:
        ingress = serve.get_app_handle(APP_NAME)
        # Long enough answers that the requests overlap, so the router spreads them over both replicas by load.
        # Right after a deploy the ingress's handle may not know the second replica yet; then a round lands on one
        # replica, and the next round, of new prompts, spreads.
        spread = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        groups = decode_replicas()
        prompts: list[list[int]] = []
        for round_ in range(3):  # 24 prompts at most: the survivor's 512 blocks hold them all
            batch = [[(31 * p + 7 * j + 5) % 49152 for j in range(200)] for p in range(8 * round_, 8 * round_ + 8)]
            assert cached_tokens(ingress, batch, spread) == [0] * len(batch)
            prompts += batch
            blocks = [set(hash_full_blocks(p, cluster.block_size)) for p in prompts]

            def all_reported() -> dict[str, set[bytes]] | None:
                held = block_sets(redis_url, groups)
                return held if set.union(*blocks) <= set.union(*held.values()) else None

            held = eventually(all_reported, "the groups never reported the prompts' blocks")
            if all(any(b <= held[g] for b in blocks) for g in groups):
                break
        assert all(any(b <= held[g] for b in blocks) for g in groups), \
            f"routing put every prompt on one replica: {[len(h) for h in held.values()]} blocks held"

        scale_decode_pool(cluster, 1)
        [survivor] = decode_replicas()
        [gone] = groups - {survivor}
        theirs = [p for p, b in zip(prompts, blocks) if not b <= held[survivor]]
        unique = held[gone] - held[survivor]
        eventually(lambda: unique <= block_sets(redis_url, {survivor})[survivor],
                   "the survivor never reported the blocks handed to it")
        full_blocks = (len(prompts[0]) - 1) // cluster.block_size * cluster.block_size
        assert cached_tokens(ingress, theirs) == [full_blocks] * len(theirs)
        assert any(f"decode replica {gone} handed" in log.read_text()
                   for log in serve_logs().glob("replica_*decode*.log"))
    finally:
        serve.delete(APP_NAME)
