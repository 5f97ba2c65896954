"""Stored responses of the Responses API, in the cluster's Redis: what `previous_response_id` continues and
GET /v1/responses/{id} returns.

Any ingress replica may serve a conversation's next turn, so the store is Redis, not a replica's memory. An entry
holds the response object and the conversation that led to it (its input messages and the reply, without the
request's instructions, which OpenAI does not carry over), so a continuation costs one read. Entries expire after
`api.response_ttl_s`: a serving cluster's Redis is not an archive.

    {ns}:response:<response id>   JSON {"response": the response object, "conversation": [{role, content}, ...]}
"""

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from workers.kv_events import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # the messages a continuation starts from, the reply (and its calls) last


class ResponseStore:
    def __init__(self, redis_url: str, ttl_s: int, namespace: str = DEFAULT_NAMESPACE):
        self._redis = redis.asyncio.Redis.from_url(redis_url)
        self._ttl_s = ttl_s
        self._prefix = f"{{{namespace}}}:response:"

    async def save(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """False when Redis could not take it: the answer is still the client's, only not stored."""
        entry = json.dumps({"response": response, "conversation": conversation}, ensure_ascii=False)
        try:
            await self._redis.set(self._prefix + response["id"], entry, ex=self._ttl_s)
        except redis.RedisError as e:
            logger.warning("response %s was not stored: %s", response["id"], e)
            return False
        return True

    async def load(self, response_id: str) -> StoredResponse | None:
        entry = await self._redis.get(self._prefix + response_id)
        if entry is None:
            return None
        stored = json.loads(entry)
        return StoredResponse(stored["response"], stored["conversation"])

    async def delete(self, response_id: str) -> bool:
        return bool(await self._redis.delete(self._prefix + response_id))
