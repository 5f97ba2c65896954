"""Stored Responses API responses live in Redis under a TTL, each with the conversation that led to it; a Redis
that cannot take one leaves the answer unstored rather than failed. A background response's state is shared there
by every replica: once it ends nothing overwrites it, a cancellation reaches the replica that runs it, its events
can be read again from any point, and one whose replica stopped refreshing its run key reads as failed."""

import asyncio
import uuid

import redis

from router.response_store import STOPPED, ResponseStore, StoredResponse

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_a_response_is_kept_with_its_conversation_until_deleted_or_expired(redis_url):
    namespace = f"test-responses-{uuid.uuid4().hex}"
    response = {"id": "resp_1", "object": "response", "output": []}

    async def scenario():
        store = ResponseStore(redis_url, ttl_s=30, namespace=namespace)
        assert await store.save(response, CONVERSATION)
        stored = await store.load("resp_1")
        deleted = await store.delete("resp_1")
        return stored, deleted, await store.load("resp_1"), await store.delete("resp_1")

    stored, deleted, after, deleted_again = asyncio.run(scenario())
    assert (stored.response, stored.conversation) == (response, CONVERSATION)
    assert deleted and after is None and not deleted_again

    async def expiring():
        await ResponseStore(redis_url, ttl_s=30, namespace=namespace).save(response, CONVERSATION)

    asyncio.run(expiring())
    assert 0 < redis.Redis.from_url(redis_url).ttl(f"{{{namespace}}}:response:resp_1") <= 30


def test_a_redis_that_cannot_be_reached_leaves_the_response_unstored():
    store = ResponseStore("redis://127.0.0.1:1/0", ttl_s=30)  # nothing listens on port 1
    assert asyncio.run(store.save({"id": "resp_2"}, CONVERSATION)) is False


def _running(status: str = "queued") -> dict:
    return {"id": "resp_bg", "object": "response", "status": status, "background": True, "output": []}


def test_a_background_response_advances_until_it_ends_and_a_cancellation_reaches_its_run(redis_url):
    async def scenario():
        store = ResponseStore(redis_url, ttl_s=30, namespace=f"test-responses-{uuid.uuid4().hex}")
        await store.start(_running(), CONVERSATION[:1], events=False)
        advanced = await store.advance(_running("in_progress"), CONVERSATION[:1])
        asked_before = await store.beat("resp_bg")
        cancelled = await store.cancel(await store.load("resp_bg"))
        asked_after = await store.beat("resp_bg")
        # The run ends as it is cancelled: its last save does not overwrite the cancellation.
        finished = await store.advance({**_running(), "status": "completed"}, CONVERSATION)
        return advanced, asked_before, cancelled, asked_after, finished, await store.load("resp_bg"), \
            await store.cancel(StoredResponse(_running("in_progress"), CONVERSATION[:1]))

    advanced, asked_before, cancelled, asked_after, finished, stored, again = asyncio.run(scenario())
    assert advanced and not asked_before and asked_after
    assert cancelled["status"] == "cancelled" and not finished
    assert stored.response == cancelled and stored.conversation == CONVERSATION[:1]
    assert again is None  # it has ended: nothing to cancel


def test_a_background_response_whose_replica_stopped_refreshing_its_run_reads_as_failed(redis_url):
    """Its replica is taken to have died by deleting the run key, which is what its lapsing amounts to."""
    namespace = f"test-responses-{uuid.uuid4().hex}"

    async def scenario():
        store = ResponseStore(redis_url, ttl_s=30, namespace=namespace)
        await store.start(_running(), CONVERSATION[:1], events=True)
        alive = await store.load("resp_bg")
        await redis.asyncio.Redis.from_url(redis_url).delete(f"{{{namespace}}}:response-run:resp_bg")
        return alive, await store.load("resp_bg"), await store.advance(_running("in_progress"), CONVERSATION[:1])

    alive, dead, advanced = asyncio.run(scenario())
    assert alive.response["status"] == "queued" and alive.events
    assert dead.response["status"] == "failed" and dead.response["error"] == STOPPED and dead.events
    assert not advanced  # a failed response has ended


def test_a_background_responses_events_are_read_from_any_point_as_they_come(redis_url):
    namespace = f"test-responses-{uuid.uuid4().hex}"

    async def scenario():
        store = ResponseStore(redis_url, ttl_s=30, namespace=namespace)
        await store.start(_running(), CONVERSATION[:1], events=True)
        await store.add_event("resp_bg", "event 0")
        reader = asyncio.ensure_future(_read(store.events("resp_bg", after=-1)))
        late = asyncio.ensure_future(_read(store.events("resp_bg", after=1)))
        await asyncio.sleep(0.2)  # the readers wait for what is still to come
        for i in (1, 2):
            await store.add_event("resp_bg", f"event {i}")
        await store.finish("resp_bg", events=True)
        return await asyncio.wait_for(reader, 10), await asyncio.wait_for(late, 10), \
            await _read(store.events("resp_bg", after=0))

    whole, late, replayed = asyncio.run(scenario())
    assert whole == ["event 0", "event 1", "event 2"]
    assert late == ["event 2"] and replayed == ["event 1", "event 2"]
    assert 0 < redis.Redis.from_url(redis_url).ttl(f"{{{namespace}}}:response-events:resp_bg") <= 30  # they expire


async def _read(events) -> list[str]:
    return [event async for event in events]
