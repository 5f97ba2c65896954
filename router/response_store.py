"""Stored responses of the Responses API, in the cluster's Redis: what `previous_response_id` continues, what
GET /v1/responses/{id} returns, and the shared state of background responses (router/background.py).

Any ingress replica may serve a conversation's next turn, or the poll, stream or cancellation of a background
response another replica runs, so the store is Redis, not a replica's memory. An entry holds the response object
and the conversation that led to it (its input messages and the reply, without the request's instructions, which
OpenAI does not carry over), so a continuation costs one read. Entries expire after `api.response_ttl_s`: a serving
cluster's Redis is not an archive.

    {ns}:response:<id>          JSON {"response": the response object, "conversation": [{role, content}, ...],
                                "events": whether its events are kept (a background response created streaming)}
    {ns}:response-run:<id>      while a background response runs: "running", refreshed by its replica every
                                RUN_BEAT_S and expiring RUN_TTL_S later (so a replica that died lets it lapse), or
                                "cancel" once a cancellation asked its replica to stop it
    {ns}:response-events:<id>   a Redis stream of its server-sent events, in order, then an "end" entry

A response runs while its status is queued or in_progress; once it has ended (completed, incomplete, failed or
cancelled) its entry is final: a later save of a background response (`advance`) leaves it as it is, so a run
that finishes as it is cancelled cannot overwrite the cancellation.
"""

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis

from router.redis_client import connect
from workers.kv_events import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

_TIMEOUT_S = 2.0

RUNNING = ("queued", "in_progress")
RUN_BEAT_S = 0.5  # how often a replica refreshes the run key of each background response it runs
RUN_TTL_S = 10  # how long after its replica's last refresh a background response reads as failed
STOPPED = {"code": "server_error", "message": "the server running this background response stopped before it "
                                             "finished; create it again"}

# Sets the entry (KEYS[1]) to ARGV[1] for ARGV[2] seconds if the response in it is still running, and then, given a
# run key (KEYS[2]), marks the run to be cancelled. Returns 1 if it set the entry.
_ADVANCE = """
local entry = redis.call('GET', KEYS[1])
if not entry then return 0 end
local status = cjson.decode(entry)['response']['status']
if status ~= 'queued' and status ~= 'in_progress' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if KEYS[2] then redis.call('SET', KEYS[2], 'cancel', 'XX', 'KEEPTTL') end
return 1
"""


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # the messages a continuation starts from, the reply (and its calls) last
    events: bool = False  # its server-sent events are kept, to be streamed again (GET ...?stream=true)


class ResponseStore:
    def __init__(self, redis_url: str, ttl_s: int, namespace: str = DEFAULT_NAMESPACE):
        self._redis = connect(redis_url, _TIMEOUT_S)
        self._ttl_s = ttl_s
        self._prefix = f"{{{namespace}}}:response"
        self._advance = self._redis.register_script(_ADVANCE)

    async def save(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """False when Redis could not take it: the answer is still the client's, only not stored."""
        try:
            await self._redis.set(self._key(response["id"]), _entry(response, conversation), ex=self._ttl_s)
        except redis.RedisError as e:
            logger.warning("response %s was not stored: %s", response["id"], e)
            return False
        return True

    async def load(self, response_id: str) -> StoredResponse | None:
        """The stored response; a background response whose replica stopped refreshing its run key (it died)
        reads as failed, and is stored so."""
        entry = await self._redis.get(self._key(response_id))
        if entry is None:
            return None
        stored = StoredResponse(**json.loads(entry))
        if stored.response.get("status") not in RUNNING or await self._redis.exists(self._key(response_id, "run")):
            return stored
        failed = {**stored.response, "status": "failed", "error": STOPPED}
        if await self.advance(failed, stored.conversation, events=stored.events):
            return StoredResponse(failed, stored.conversation, stored.events)
        entry = await self._redis.get(self._key(response_id))  # it ended just now
        return None if entry is None else StoredResponse(**json.loads(entry))

    async def delete(self, response_id: str) -> bool:
        return bool(await self._redis.delete(self._key(response_id)))

    async def start(self, response: dict[str, Any], conversation: list[dict[str, Any]], events: bool) -> None:
        """Stores a background response as it starts (queued), with its run key: from here on, any replica
        sees it run."""
        response_id = response["id"]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(response_id, "run"), "running", ex=RUN_TTL_S)
            pipe.set(self._key(response_id), _entry(response, conversation, events), ex=self._ttl_s)
            await pipe.execute()

    async def advance(self, response: dict[str, Any], conversation: list[dict[str, Any]],
                      events: bool = False) -> bool:
        """Saves a running background response's new state (in progress, or how it ended) unless it has ended
        meanwhile; False if it had, or Redis could not take it."""
        try:
            return bool(await self._advance(keys=[self._key(response["id"])],
                                            args=[_entry(response, conversation, events), self._ttl_s]))
        except redis.RedisError as e:
            logger.warning("background response %s was not updated: %s", response["id"], e)
            return False

    async def cancel(self, stored: StoredResponse) -> dict[str, Any] | None:
        """Cancels a running background response: stores it as cancelled and marks its run, so the replica
        running it stops it at its next beat. None if it ended first."""
        response = {**stored.response, "status": "cancelled"}
        response_id = response["id"]
        cancelled = await self._advance(keys=[self._key(response_id), self._key(response_id, "run")],
                                        args=[_entry(response, stored.conversation, stored.events), self._ttl_s])
        return response if cancelled else None

    async def beat(self, response_id: str) -> bool:
        """Refreshes a background response's run key, as its replica runs it; True once it is to be cancelled."""
        return await self._redis.set(self._key(response_id, "run"), "running", ex=RUN_TTL_S, get=True) == b"cancel"

    async def add_event(self, response_id: str, event: str) -> None:
        key = self._key(response_id, "events")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"event": event})
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def finish(self, response_id: str, events: bool) -> None:
        """A background run is over: its event stream ends, and its run key goes."""
        async with self._redis.pipeline(transaction=False) as pipe:
            if events:
                pipe.xadd(self._key(response_id, "events"), {"end": 1})
                pipe.expire(self._key(response_id, "events"), self._ttl_s)  # ended before its first event, too
            pipe.delete(self._key(response_id, "run"))
            await pipe.execute()

    async def events(self, response_id: str, after: int) -> AsyncIterator[str]:
        """A background response's server-sent events, those after the sequence number `after`, as they are
        added, until its stream ends (or its replica died: its run key lapsed and nothing more came)."""
        key, last, position, live = self._key(response_id, "events"), "0-0", 0, True
        while True:
            batch = await self._redis.xread({key: last}, count=256, block=1000 if live else None)
            entries = batch[0][1] if batch else []
            for entry_id, fields in entries:
                last = entry_id
                if b"end" in fields:
                    return
                if position > after:
                    yield fields[b"event"].decode()
                position += 1
            if not entries:
                if not live:
                    return
                live = bool(await self._redis.exists(self._key(response_id, "run")))

    def _key(self, response_id: str, kind: str = "") -> str:
        return f"{self._prefix}{'-' + kind if kind else ''}:{response_id}"


def _entry(response: dict[str, Any], conversation: list[dict[str, Any]], events: bool = False) -> str:
    return json.dumps({"response": response, "conversation": conversation, "events": events}, ensure_ascii=False)
