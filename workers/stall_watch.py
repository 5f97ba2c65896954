"""A group whose step never ends is ended, so its requests move on as from a lost group.

A rank that hangs (its process stopped, a kernel or a collective that never returns) does not die: nothing fails,
the group's streams just stop. Serve's health check fails the replica only after three 30 s timeouts, and then
waits out its graceful shutdown for streams that never end: 170 s in all, measured with SIGSTOP. So while the
group has requests its replica asks rank 0 every `period_s` how long its current step has gone without progress
(the busy_s of its load, answered beside the engine thread, not after the step: AsyncLLMEngine.busy_s): since the
step began or the model last finished a layer. A step stuck for `timeout_s`, or no answer for that long (rank 0's
process itself is stopped), and the replica ends the group's ranks: every stream fails at once, the ingress moves
each request to another group (with exactly its tokens), and Serve replaces the replica at its next health check.
A long step is not a stuck one while its layers keep finishing (a long prefill of a large model on a CPU), so
`timeout_s` need only exceed the longest stretch without a finished layer: one layer of such a prefill, or a KV
transfer (kv_transfer_timeout_s), which runs no layer.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

logger = logging.getLogger(__name__)


class StallWatch:
    def __init__(self, load: Callable[[], Awaitable[dict]], end: Callable[[], None], timeout_s: float,
                 period_s: float = 2.0):
        """`load` answers the group's load (WorkerGroup.load); `end` ends the group's ranks."""
        self.load = load
        self.end = end
        self.timeout_s = timeout_s
        self.period_s = period_s
        self.stalled = False
        self._requests = 0
        self._task: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """While the block runs, the group is watched: a request in flight is what a hung step costs."""
        self._requests += 1
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="stall-watch")
        try:
            yield
        finally:
            self._requests -= 1

    async def _watch(self) -> None:
        try:
            while self._requests and not self.stalled:
                await asyncio.sleep(self.period_s)
                try:
                    busy = (await asyncio.wait_for(self.load(), self.timeout_s))["busy_s"]
                except asyncio.TimeoutError:
                    self._stall(f"rank 0 has not answered for {self.timeout_s:.0f} s (its process is stopped)")
                except Exception:
                    pass  # a group whose rank died fails its requests itself, and Serve's health check replaces it
                else:
                    if busy > self.timeout_s:
                        self._stall(f"its step has made no progress for {busy:.0f} s (a kernel or a collective that "
                                    "does not return, or a rank that stopped)")
        finally:
            self._task = None

    def _stall(self, why: str) -> None:
        self.stalled = True
        logger.error("the worker group hangs: %s; ending its ranks so that its %d request(s) move to another group "
                     "and Serve replaces this replica", why, self._requests)
        self.end()
