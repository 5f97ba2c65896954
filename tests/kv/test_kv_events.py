"""KV events: the block manager reports every change to its cached hashes, and the publisher mirrors them into a
real Redis so that the group's set always equals the engine's cache: after events that never arrived (the queue
overflowed, Redis was down, restarted empty or lost the group's state) it publishes the whole cache again."""

import time
import uuid

import pytest
import redis

from cluster.redis_server import LocalRedis
from tests.kv.cache_traffic import BS, churn, serve
from workers.engine.block_manager import BlockManager
from workers.kv.hashing import BlockHash
from workers.kv_events import KVEventPublisher, KVKeys, decode_entry


class Recorder:
    """A KVEventSink that keeps what it is told, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def blocks_stored(self, block_hashes, parent_hash):
        self.events.append(("stored", list(block_hashes), parent_hash))

    def blocks_removed(self, block_hashes):
        self.events.append(("removed", list(block_hashes)))

    def cache_cleared(self):
        self.events.append(("cleared",))

    def replay(self) -> set[BlockHash]:
        held: set[BlockHash] = set()
        for kind, *rest in self.events:
            if kind == "stored":
                held.update(rest[0])
            elif kind == "removed":
                held.difference_update(rest[0])
            else:
                held.clear()
        return held


# -- the block manager's events ----------------------------------------------------------------------------------


def test_replaying_the_events_gives_exactly_the_cached_hashes():
    sink = Recorder()
    bm = BlockManager(12, BS, kv_events=sink)
    churn(bm, 200)
    assert any(e[0] == "removed" for e in sink.events)
    assert sink.replay() == set(bm.cached)


def test_with_a_host_tier_the_events_give_what_the_device_and_the_host_tier_hold():
    """A block saved to the host tier stays the group's; it leaves when neither tier holds it."""
    sink = Recorder()
    bm = BlockManager(12, BS, kv_events=sink, num_host_blocks=6)
    churn(bm, 200)
    assert bm.num_reloaded_blocks > 0 and any(e[0] == "removed" for e in sink.events)
    assert sink.replay() == set(bm.cached) | set(bm.host)


def test_a_prompt_is_stored_in_one_event_chained_to_the_blocks_before_it():
    sink = Recorder()
    bm = BlockManager(8, BS, kv_events=sink)
    first = serve(bm, range(9), "a")
    second = serve(bm, list(range(8)) + list(range(50, 63)), "b")  # hits 2 blocks, stores 3 more
    assert sink.events == [
        ("stored", first.block_hashes[:2], None),
        ("stored", second.block_hashes[2:5], second.block_hashes[1]),
    ]


def test_evicting_cached_blocks_reports_them_removed_in_one_event():
    sink = Recorder()
    bm = BlockManager(3, BS, kv_events=sink)
    a = serve(bm, range(8), "a")
    serve(bm, range(100, 112), "b")  # three blocks: the free one, then a's two cached blocks (tail first)
    assert sink.events[1] == ("removed", [a.block_hashes[1], a.block_hashes[0]])


def test_reset_reports_cleared_and_no_prefix_cache_reports_nothing():
    sink = Recorder()
    bm = BlockManager(8, BS, kv_events=sink)
    serve(bm, range(8))
    bm.reset_prefix_cache()
    assert sink.events[-1] == ("cleared",)
    quiet = Recorder()
    serve(BlockManager(8, BS, enable_prefix_caching=False, kv_events=quiet), range(8))
    assert quiet.events == []


# -- the publisher, against a real Redis ---------------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(redis_url) -> redis.Redis:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def publishers(redis_url, namespace):
    """`make(group_id, **options)` -> a started publisher; all are closed after the test."""
    made: list[KVEventPublisher] = []

    def make(group_id: str, **options) -> KVEventPublisher:
        publisher = KVEventPublisher(redis_url, group_id, namespace=namespace, **options)
        publisher.start()
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.close()


def test_the_group_set_in_redis_equals_the_engine_cache(publishers, client, namespace):
    publisher = publishers("g0")
    bm = BlockManager(12, BS, kv_events=publisher)
    churn(bm, 200)
    assert publisher.flush()
    assert client.smembers(KVKeys(namespace).blocks("g0")) == set(bm.cached)


def test_the_stream_holds_every_event_with_consecutive_sequence_numbers(publishers, client, namespace):
    publisher = publishers("g0")
    bm = BlockManager(4, BS, kv_events=publisher)
    a = serve(bm, range(8), "a")
    serve(bm, range(100, 116), "b")  # evicts a's blocks
    assert publisher.flush()
    entries = [decode_entry(fields) for _, fields in client.xrange(KVKeys(namespace).events)]
    assert [(seq, e.kind) for seq, e in entries] == [(0, "cleared"), (1, "stored"), (2, "removed"), (3, "stored")]
    assert entries[1][1].block_hashes == tuple(a.block_hashes)
    assert all(e.group_id == "g0" and e.timestamp > 0 for _, e in entries)


def test_a_restarted_group_starts_empty(publishers, client, namespace):
    keys = KVKeys(namespace)
    client.sadd(keys.blocks("g0"), b"\x01" * 32)  # left behind by a previous process of the same group
    publishers("g0")
    assert client.smembers(keys.blocks("g0")) == set()
    assert client.sismember(keys.groups, "g0")


def test_a_cache_reset_empties_the_set_but_the_group_stays(publishers, client, namespace):
    publisher = publishers("g0")
    bm = BlockManager(8, BS, kv_events=publisher)
    serve(bm, range(12))
    bm.reset_prefix_cache()
    assert publisher.flush()
    keys = KVKeys(namespace)
    assert client.smembers(keys.blocks("g0")) == set()
    assert client.exists(keys.alive("g0"))


def test_the_heartbeat_outlives_the_ttl_and_close_retires_the_group(publishers, client, namespace):
    publisher = publishers("g0", ttl_s=0.3)
    serve(BlockManager(8, BS, kv_events=publisher), range(12))
    assert publisher.flush()
    keys = KVKeys(namespace)
    time.sleep(0.8)
    assert client.exists(keys.alive("g0"))
    publisher.close()
    assert not client.exists(keys.alive("g0"), keys.blocks("g0"))
    assert not client.sismember(keys.groups, "g0")
    _, fields = client.xrevrange(keys.events, count=1)[0]
    assert decode_entry(fields)[1].kind == "cleared"


def test_events_lost_from_a_full_queue_are_made_good_by_publishing_the_whole_cache(redis_url, client, namespace):
    publisher = KVEventPublisher(redis_url, "g0", namespace=namespace, max_queued=2)
    bm = BlockManager(12, BS, kv_events=publisher)
    churn(bm, 50)  # before start: the queue overflows and events are dropped
    publisher.start()
    churn(bm, 50, seed=1)
    serve(bm, range(2000, 2008))
    assert publisher.flush()
    published = client.smembers(KVKeys(namespace).blocks("g0"))
    publisher.close()
    assert published == set(bm.cached)


def test_a_group_whose_state_in_redis_is_gone_publishes_its_whole_cache_again(publishers, client, namespace):
    """As after a router retired it (its heartbeat lapsed) or a Redis that lost its data without the publisher
    seeing an error: its next event, or while idle its next heartbeat, finds its state gone."""
    keys = KVKeys(namespace)
    publisher = publishers("g0", ttl_s=0.6)
    bm = BlockManager(12, BS, kv_events=publisher)
    churn(bm, 50)
    assert publisher.flush()
    client.delete(keys.blocks("g0"))
    client.srem(keys.groups, "g0")
    serve(bm, range(3000, 3008))  # one stored event, on a group Redis no longer has
    assert publisher.flush()
    assert publisher.flush()  # the resync that event asked for
    assert client.smembers(keys.blocks("g0")) == set(bm.cached)

    client.delete(keys.blocks("g0"))
    client.srem(keys.groups, "g0")
    deadline = time.monotonic() + 5
    while client.smembers(keys.blocks("g0")) != set(bm.cached) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.smembers(keys.blocks("g0")) == set(bm.cached)  # idle: the heartbeat found it gone


def test_after_redis_restarts_empty_the_group_publishes_its_whole_cache_again(namespace):
    server = LocalRedis()
    publisher = KVEventPublisher(server.url, "g0", namespace=namespace, ttl_s=0.6, retry_s=0.1)
    publisher.start()
    bm = BlockManager(12, BS, kv_events=publisher)
    churn(bm, 50)
    assert publisher.flush()
    server.stop()
    churn(bm, 20, seed=2)  # while Redis is down
    server = LocalRedis(port=server.port)
    client = redis.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 5
        while client.smembers(KVKeys(namespace).blocks("g0")) != set(bm.cached) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.smembers(KVKeys(namespace).blocks("g0")) == set(bm.cached)
    finally:
        publisher.close()
        client.close()
        server.stop()


def test_an_unreachable_redis_never_stops_the_engine():
    publisher = KVEventPublisher("redis://127.0.0.1:1", "g0", retry_s=0.05)
    publisher.start()
    serve(BlockManager(8, BS, kv_events=publisher), range(12))
    assert not publisher.flush(timeout_s=0.2)
    publisher.close()
