"""The ingress reads each group's load from its report in Redis, as the group's replica reports it to Serve's
router: every sequence it holds work for (running, waiting, pinned for a decode group) weighs on it."""

import asyncio
import json
import uuid

from router.load_view import LoadView
from router.policy import GroupLoad
from workers.kv_events import KVKeys


def test_a_groups_sequences_are_all_it_holds_work_for(redis_url):
    import redis

    keys = KVKeys(f"test-load-view-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    base = dict(queued_prefill_tokens=120, free_blocks=48, total_blocks=64, running_seqs=3)
    client.sadd(keys.groups, "p1", "d1")
    client.set(keys.load("p1"), json.dumps(dict(base, role="prefill", waiting_seqs=2, pinned_seqs=4, busy_seqs=9)))
    client.set(keys.load("d1"), json.dumps(dict(base, role="decode")))  # an older report: running only

    async def read():
        view = LoadView(redis_url, namespace=keys.namespace)
        try:
            return await view.loads()
        finally:
            await view.close()

    loads = asyncio.run(read())
    assert loads["prefill"] == [GroupLoad("p1", 48, 64, queued_prefill_tokens=120, running_seqs=9)]
    assert loads["decode"] == [GroupLoad("d1", 48, 64, queued_prefill_tokens=120, running_seqs=3)]


def test_the_blocks_other_groups_hold_are_the_union_of_their_sets_and_none_without_groups(redis_url):
    import redis

    keys = KVKeys(f"test-load-view-{uuid.uuid4().hex}")
    client = redis.Redis.from_url(redis_url)
    client.sadd(keys.blocks("p1"), b"a", b"b")
    client.sadd(keys.blocks("p2"), b"b", b"c")
    client.sadd(keys.blocks("p3"), b"d")

    async def read():
        view = LoadView(redis_url, namespace=keys.namespace)
        try:
            return await view.blocks_held_by(["p1", "p2"]), await view.blocks_held_by([])
        finally:
            await view.close()

    assert asyncio.run(read()) == ({b"a", b"b", b"c"}, set())
