"""The router's KV-block index: longest cached prefix per group, groups dropped whole, memory that follows the
caches; and, against a real Redis, an index that equals the engines' caches whenever a router starts or restarts."""

import asyncio
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis

from router.kv_index import KVIndex, KVIndexFollower
from tests.kv.cache_traffic import BS, churn, serve
from workers.engine.block_manager import BlockManager
from workers.kv.hashing import hash_full_blocks
from workers.kv_events import KVEvent, KVEventPublisher, KVKeys

REPO = Path(__file__).resolve().parents[2]


def h(*blocks: int) -> list[bytes]:
    """Hashes of a prompt made of the given one-token-per-block values, chained like real prompts."""
    return hash_full_blocks([b for b in blocks for _ in range(BS)], BS)


# -- the index alone ---------------------------------------------------------------------------------------------


def test_match_counts_each_groups_leading_blocks_and_stops_at_its_first_miss():
    index = KVIndex()
    prompt = h(1, 2, 3, 4)
    index.add("a", prompt[:3])
    index.add("b", prompt[:1])
    index.add("c", prompt[1:])  # holds later blocks but not the first: no prefix
    index.add("d", [prompt[0], prompt[2]])  # a hole after the first block
    assert index.match(prompt) == {"a": 3, "b": 1, "d": 1}
    assert index.match(h(9, 2, 3)) == {}
    assert index.match([]) == {}


def test_a_cache_salt_never_shares_credit():
    index = KVIndex()
    tokens = list(range(3 * BS))
    index.add("a", hash_full_blocks(tokens, BS, cache_salt="tenant-a"))
    assert index.match(hash_full_blocks(tokens, BS, cache_salt="tenant-a")) == {"a": 3}
    assert index.match(hash_full_blocks(tokens, BS, cache_salt="tenant-b")) == {}
    assert index.match(hash_full_blocks(tokens, BS)) == {}


def test_events_add_remove_and_clear_one_group_only():
    index = KVIndex()
    prompt = h(1, 2, 3)
    index.apply(KVEvent("a", "stored", tuple(prompt)))
    index.apply(KVEvent("b", "stored", tuple(prompt[:2])))
    index.apply(KVEvent("a", "removed", (prompt[1],)))
    assert index.match(prompt) == {"a": 1, "b": 2}
    index.apply(KVEvent("b", "cleared"))
    assert index.match(prompt) == {"a": 1}
    assert index.groups() == {"a"}
    assert index.blocks("a") == {prompt[0], prompt[2]}
    assert (index.num_blocks("a"), index.num_blocks("b")) == (2, 0)


def test_drop_group_leaves_blocks_other_groups_hold():
    index = KVIndex()
    prompt = h(1, 2)
    index.add("a", prompt)
    index.add("b", prompt[:1])
    index.drop_group("a")
    assert index.match(prompt) == {"b": 1}
    assert len(index) == 1
    index.drop_group("a")  # dropping an unknown group is a no-op


def test_memory_follows_what_groups_hold_not_the_history():
    index = KVIndex()
    rng = random.Random(0)
    held: dict[str, set[bytes]] = {"a": set(), "b": set()}
    for step in range(20_000):
        group = rng.choice("ab")
        block_hash = step.to_bytes(32, "little")
        index.add(group, [block_hash])
        held[group].add(block_hash)
        if len(held[group]) > 50:  # an engine with a 50-block cache evicts
            victim = held[group].pop()
            index.remove(group, [victim])
    assert len(index) == len(held["a"] | held["b"]) == 100
    index.remove("a", held["a"])
    index.remove("b", held["b"])
    assert len(index) == 0 and index.groups() == set()


# -- fed from a real Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def group(redis_url, namespace):
    """`make(group_id)` -> (publisher, block manager) of a live group; all are closed after the test."""
    made: list[KVEventPublisher] = []

    def make(group_id: str, **options) -> tuple[KVEventPublisher, BlockManager]:
        publisher = KVEventPublisher(redis_url, group_id, namespace=namespace, **options)
        publisher.start()
        made.append(publisher)
        return publisher, BlockManager(12, BS, kv_events=publisher)

    yield make
    for publisher in made:
        publisher.close()


def follower(url: str, namespace: str) -> KVIndexFollower:
    return KVIndexFollower(url, namespace=namespace, block_ms=50, liveness_interval_s=0.1)


@asynccontextmanager
async def following(url: str, namespace: str) -> AsyncIterator[KVIndexFollower]:
    """A router's follower, started (warm with what Redis holds) for the block and stopped after it."""
    router = follower(url, namespace)
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


async def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_a_router_started_after_the_events_is_warm_at_once(group, redis_url, namespace):
    (p0, bm0), (p1, bm1) = group("g0"), group("g1")
    churn(bm0, 100)
    churn(bm1, 100, seed=1)
    assert p0.flush() and p1.flush()

    async def scenario():
        async with following(redis_url, namespace) as router:
            assert router.index.blocks("g0") == set(bm0.cached)
            assert router.index.blocks("g1") == set(bm1.cached)

    asyncio.run(scenario())


def test_routers_started_mid_stream_miss_nothing_and_share_one_view(group, redis_url, namespace):
    publisher, bm = group("g0")

    def engine_loop():  # about half a second of steady evictions
        for step in range(20):
            churn(bm, 150, seed=step)
            time.sleep(0.02)

    engine = threading.Thread(target=engine_loop)

    async def scenario():
        engine.start()
        routers = []
        for _ in range(3):  # each starts while the engine is publishing
            await asyncio.sleep(0.1)
            routers.append(follower(redis_url, namespace))
            await routers[-1].start()
        await asyncio.to_thread(engine.join)
        assert publisher.flush()
        try:
            for router in routers:
                await router.wait_caught_up()
                assert router.index.blocks("g0") == set(bm.cached)
        finally:
            for router in routers:
                await router.stop()

    asyncio.run(scenario())


def test_an_event_delivered_twice_is_applied_once(group, redis_url, namespace):
    publisher, bm = group("g0")
    client = redis.Redis.from_url(redis_url)
    events = KVKeys(namespace).events

    async def scenario():
        async with following(redis_url, namespace) as router:
            serve(bm, range(8), "a")
            assert publisher.flush()
            stored = client.xrevrange(events, count=1)[0][1]
            serve(bm, range(100, 148), "b")  # evicts a's blocks
            assert publisher.flush()
            client.xadd(events, stored)  # the old "stored" again, e.g. from a retried write
            await router.wait_caught_up()
            assert router.index.blocks("g0") == set(bm.cached)

    asyncio.run(scenario())
    client.close()


def test_a_gap_in_a_groups_sequence_reloads_the_snapshot(group, redis_url, namespace):
    publisher, bm = group("g0")
    client = redis.Redis.from_url(redis_url)
    phantom = b"\x07" * 32

    async def scenario():
        async with following(redis_url, namespace) as router:
            client.xadd(KVKeys(namespace).events, {"group": "g0", "kind": "stored", "seq": 99, "hashes": phantom,
                                                    "parent": b"", "ts": 0})  # seq 1..98 never arrive
            churn(bm, 50)
            assert publisher.flush()
            await router.wait_caught_up()
            assert router.index.blocks("g0") == set(bm.cached)

    asyncio.run(scenario())
    client.close()


def test_a_redis_that_lost_its_data_is_noticed(group, redis_url, namespace):
    publisher, bm = group("g0")
    client = redis.Redis.from_url(redis_url)
    keys = KVKeys(namespace)

    async def scenario():
        async with following(redis_url, namespace) as router:
            churn(bm, 50)
            assert publisher.flush()
            await router.wait_caught_up()
            client.delete(keys.events, keys.seq, keys.groups, keys.blocks("g0"))  # a restart without persistence
            churn(bm, 50, seed=1)  # the group's sequence numbers start again at 1
            assert publisher.flush()
            await router.wait_caught_up()
            assert router.index.blocks("g0") == client.smembers(keys.blocks("g0"))

    asyncio.run(scenario())
    client.close()


def test_a_group_that_closes_or_resets_its_cache_is_dropped(group, redis_url, namespace):
    (p0, bm0), (p1, bm1) = group("g0"), group("g1")

    async def scenario():
        async with following(redis_url, namespace) as router:
            churn(bm0, 20)
            churn(bm1, 20, seed=1)
            assert p0.flush() and p1.flush()
            await router.wait_caught_up()
            assert router.index.groups() == {"g0", "g1"}
            p0.close()
            bm1.reset_prefix_cache()
            assert p1.flush()
            await router.wait_caught_up()
            assert router.index.groups() == set() and len(router.index) == 0

    asyncio.run(scenario())


_DOOMED_GROUP = """
import sys, time
from workers.kv_events import KVEventPublisher
publisher = KVEventPublisher(sys.argv[1], "doomed", namespace=sys.argv[2], ttl_s=0.5)
publisher.start()
publisher.blocks_stored([bytes(32)], None)
assert publisher.flush()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_group_whose_heartbeat_stops_is_dropped_by_every_router(redis_url, namespace):
    process = subprocess.Popen([sys.executable, "-c", _DOOMED_GROUP, redis_url, namespace], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"

        async def scenario():
            routers = [follower(redis_url, namespace) for _ in range(2)]
            for router in routers:
                await router.start()
            try:
                assert all(router.index.groups() == {"doomed"} for router in routers)
                process.kill()  # no goodbye: only the heartbeat's TTL tells
                await wait_for(lambda: all(not router.index.groups() for router in routers))
            finally:
                for router in routers:
                    await router.stop()

        asyncio.run(scenario())
        keys = KVKeys(namespace)
        client = redis.Redis.from_url(redis_url)
        assert not client.exists(keys.blocks("doomed")) and not client.smembers(keys.groups)
        client.close()
    finally:
        process.kill()
        process.wait()
