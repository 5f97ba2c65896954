"""Stored Responses API responses live in Redis under a TTL, each with the conversation that led to it; a Redis
that cannot take one leaves the answer unstored rather than failed."""

import asyncio
import uuid

import redis

from router.response_store import ResponseStore

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
