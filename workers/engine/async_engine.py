"""The engine for servers: asyncio callers stream outputs while the engine loop runs on its own thread.

Only the engine thread touches the engine. Callers send it small commands (add, abort) through a queue and get
outputs back on per-request asyncio queues, so a slow client never stalls a step, and a client that goes away
(its generator is closed or cancelled) aborts its request and frees its blocks.
"""

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields one output per new token (deltas in `outputs[0].delta_text`); the last has `finished`.

        Bad input raises (a ValueError subclass) before anything is yielded.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request_id if request_id is not None else uuid.uuid4().hex

        def add() -> None:
            self.engine.add_request(prompt, params, rid, cache_salt)
            self._streams[rid] = (loop, outputs)

        try:
            await self._call(add)
        except asyncio.CancelledError:
            # Commands run in order, so this abort lands after the add it races with.
            self._commands.put(lambda: self._abort(rid))
            raise
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._commands.put(lambda: self._abort(rid))

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._abort(request_id))

    async def stats(self) -> EngineStats:
        def read() -> EngineStats:
            sched, bm = self.engine.scheduler, self.engine.block_manager
            return EngineStats(len(sched.running), len(sched.waiting), bm.num_free_blocks, bm.num_blocks)

        return await self._call(read)

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    async def _call(self, fn: Callable):
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up before the command ran; skipping it keeps the engine unchanged
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, who re-raises it
                future.set_exception(e)

        self._commands.put(run)
        return await asyncio.wrap_future(future)

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(out)

    def _loop(self) -> None:
        while not self._stopped:
            idle = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    command()
                except Exception:  # a command must never take the engine thread down with it
                    logger.exception("engine command failed")
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # A step that raises fails the requests it was running; everyone else keeps being served.
            logger.exception("engine step failed; failing the running requests")
            outputs = [self.engine.fail_request(s.request_id, f"{type(e).__name__}: {e}")
                       for s in list(self.engine.scheduler.running)]
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        loop, outputs = stream
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, out)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening, drop the request
            self.engine.abort_request(out.request_id)
