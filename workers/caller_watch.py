"""Requests whose caller died are aborted: a pool replica watches each ingress replica that streams from it.

A caller that cancels its stream stops the request here (Serve cancels the replica's generator). A caller that dies
cannot: Ray does not stop a stream whose caller is gone, so a lost ingress replica (SIGKILL, out of memory, its node
gone) would leave every request it was streaming decoding to max_tokens, holding KV blocks and slowing the batch
for nobody. So the ingress passes its own actor with each stream (`Caller`), and the replica pings each caller
that has requests in flight every `period_s`; when one is dead, its requests are aborted and their blocks freed.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    actor_id: str
    actor: ActorHandle

    @staticmethod
    def current() -> "Caller | None":
        """The actor this runs in (an ingress replica); None outside an actor."""
        if not ray.is_initialized():  # asking for the runtime context would start Ray
            return None
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        return Caller(actor_id, context.current_actor) if actor_id is not None else None


class CallerWatch:
    def __init__(self, abort: Callable[[str], Awaitable[None]], period_s: float = 2.0):
        self.abort = abort
        self.period_s = period_s
        self._requests: dict[str, set[str]] = {}  # caller's actor id -> its requests in flight here
        self._watchers: dict[str, asyncio.Task] = {}

    @contextlib.asynccontextmanager
    async def watching(self, caller: Caller | None, request_id: str) -> AsyncIterator[None]:
        """While the block runs, the request is aborted if its caller dies; None: nobody to watch."""
        if caller is None:
            yield
            return
        requests = self._requests.setdefault(caller.actor_id, set())
        requests.add(request_id)
        if caller.actor_id not in self._watchers:
            self._watchers[caller.actor_id] = asyncio.create_task(self._watch(caller), name="caller-watch")
        try:
            yield
        finally:
            requests.discard(request_id)

    async def _watch(self, caller: Caller) -> None:
        """Pings the caller while it has requests here; a busy caller that answers late is not dead."""
        requests = self._requests[caller.actor_id]
        try:
            while requests:
                await asyncio.sleep(self.period_s)
                try:
                    await asyncio.wait_for(caller.actor.__ray_ready__.remote(), self.period_s * 5)
                except ray.exceptions.ActorDiedError:
                    lost = sorted(requests)
                    logger.warning("the caller of %d request(s) here (actor %s) died; aborting them", len(lost),
                                   caller.actor_id)
                    for request_id in lost:
                        await self.abort(request_id)
                    return
                except (asyncio.TimeoutError, ray.exceptions.RayActorError):
                    pass  # not known to be dead (still starting, or busy): ask again
        finally:
            # A caller with no requests left was last looked at with no await since, and a dead one sends none.
            del self._watchers[caller.actor_id]
            del self._requests[caller.actor_id]
