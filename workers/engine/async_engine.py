"""The engine for servers: asyncio callers stream outputs while the engine loop runs on its own thread.

Only the engine thread touches the engine. Callers send it small commands (add, abort) through a queue and get
outputs back on per-request asyncio queues, so a slow client never stalls a step, and a client that goes away
(its generator is closed or cancelled) aborts its request and frees its blocks. What may take long before a
request starts, compiling its structured output's grammar, happens on threads of its own.

This is the one interface servers use, whatever the engine's shape: in process here, or a tensor-parallel group
on Ray (workers/group.py) with the same methods. Both roles of disaggregation are methods too: `prefill` on a
prefill group returns a handoff, and `generate_prefilled` on a decode group moves the KV from the prefill group
named in it and streams the rest of the request.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from workers.engine.config import EngineConfig
from workers.engine.errors import GroupBrokenError, KVCacheFullError, RequestFailedError
from workers.engine.handoff import KVHandoff
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import Continuation, RequestOutput
from workers.engine.recent_prefixes import Prefix
from workers.engine.sampling_params import SamplingParams
from workers.engine.stats import EngineStats
from workers.kv.hashing import BlockHash
from workers.kv_commands import DropChannel, KVCommand, TransferPlan, TransferRefused

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

logger = logging.getLogger(__name__)

# How long an abort for a request the engine has not seen yet is remembered: an abort sent when a caller leaves
# can overtake the call that adds the request (separate actor calls on a TP group's rank 0), and the request must
# then never start. Far longer than any such race; short enough that the set stays small.
_EARLY_ABORT_TTL_S = 60.0
# A prefilled request waiting for free blocks tries again when the engine frees some, and at least this often
# (blocks can also become usable without more being free: a prefix another request just cached).
_ROOM_RETRY_S = 1.0
# Threads compiling structured outputs' grammars (xgrammar releases the GIL): more than one, so a grammar that takes
# a minute to compile does not hold up the next request's.
_GRAMMAR_THREADS = 2


class KVSource(Protocol):
    """What a decode group needs of the prefill group that holds a request's KV."""

    def send_kv(self, command: KVCommand) -> Awaitable[int]: ...

    def claim(self, request_id: str) -> None: ...

    def release(self, request_id: str) -> Awaitable[None]: ...

    def check_health(self) -> Awaitable[EngineStats]: ...


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._transfer_locks: defaultdict[object, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._load: dict[str, int] = {}
        self._early_aborts: dict[str, float] = {}  # request id -> when its abort arrived before the request
        # Prefilled requests waiting for free blocks, woken when the engine frees some (engine thread only).
        self._room_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._free_blocks = 0
        self._grammar_threads = ThreadPoolExecutor(_GRAMMAR_THREADS, thread_name_prefix="tandem-grammar")
        # Why this tensor-parallel group can no longer step, once a rank failed mid-step: its ranks' collectives
        # are out of step, so it fails what it holds, refuses new work and fails its health check until Serve
        # replaces it.
        self.broken: str | None = None
        self._update_load()
        self._stopped = False
        self._busy_since: float | None = None  # when the engine thread began its current step or command
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None,
                       continuation: Continuation | None = None) -> AsyncIterator[RequestOutput]:
        """Yields one output per new token (deltas in `outputs[0].delta_text`); the last has `finished`.
        `continuation`: as LLMEngine.add_request's.

        Bad input raises (a ValueError subclass) before anything is yielded.
        """
        rid = request_id if request_id is not None else uuid.uuid4().hex
        grammar = await self._compile_grammar(params)
        outputs, _ = await self._start(rid, lambda: self.engine.add_request(prompt, params, rid, cache_salt,
                                                                            grammar=grammar,
                                                                            continuation=continuation))
        async for out in self._stream(rid, outputs):
            yield out

    async def prefill(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None, cache_salt: str | None = None,
                      continuation: Continuation | None = None) -> KVHandoff:
        """The prefill role: computes the prompt's KV and first token, and pins the blocks under a lease for a
        decode group; the handoff says where they are. With `continuation` (a request moved from a lost decode
        group) the KV of its tokens too, and the token after them. Raises RequestFailedError if the request ends
        otherwise."""
        rid = request_id if request_id is not None else uuid.uuid4().hex
        grammar = await self._compile_grammar(params)
        outputs, _ = await self._start(rid, lambda: self.engine.add_request(
            prompt, params, rid, cache_salt, prefill_only=True, grammar=grammar, continuation=continuation))
        async for out in self._stream(rid, outputs):
            if out.finished and out.outputs[0].finish_reason != "prefilled":
                raise RequestFailedError(f"request {rid} was aborted during prefill")
        return out.handoff

    async def embed(self, prompt: str | list[int], request_id: str | None = None, cache_salt: str | None = None,
                    lora: str | None = None, lora_path: str | None = None) -> RequestOutput:
        """An embedding request (LLMEngine.add_embedding_request): its final output, which carries the vector.
        Raises RequestFailedError if the request ends otherwise."""
        rid = request_id if request_id is not None else uuid.uuid4().hex
        outputs, _ = await self._start(rid, lambda: self.engine.add_embedding_request(prompt, rid, cache_salt, lora,
                                                                                      lora_path))
        async for out in self._stream(rid, outputs):
            if out.finished and out.embedding is None:
                raise RequestFailedError(f"request {rid} was aborted before its embedding was computed")
        return out

    async def send_kv(self, command: KVCommand) -> int:
        """The prefill group's half of a transfer (or of opening its channel): a send starts and returns at once;
        the decode group receives."""
        def send() -> int:
            if self.broken is not None:
                raise TransferRefused(f"the prefill group is out of service ({self.broken})")
            return self.engine.transfer_kv(command)

        return await self._call(send)

    def claim(self, request_id: str) -> None:
        """The handoff reached the caller, who passes it on to a decode group: pin its blocks for the whole lease
        (until now, only for the claim window). Returns at once: a claim must not hold up the request."""
        self._commands.put(lambda: self.engine.claim_pinned(request_id))

    async def release(self, request_id: str) -> None:
        """The decode group has the KV, or gave up on it: unpin the blocks."""
        await self._call(lambda: self.engine.release_pinned(request_id))

    async def generate_prefilled(self, handoff: KVHandoff, params: SamplingParams | None,
                                 prefill: KVSource) -> AsyncIterator[RequestOutput]:
        """The decode role: allocates blocks, moves the KV this group lacks from `prefill` (both halves started
        here, one transfer at a time per prefill group, so their order agrees on both sides), then streams the
        rest of the request. If the transfer fails the prompt is recomputed here, with the same result."""
        rid = handoff.request_id
        caller_left = asyncio.Event()
        receive = asyncio.ensure_future(self._receive(handoff, params, prefill, caller_left))
        try:
            # A transfer is never cut short: a send the peer has started must be received, or the channel's
            # next message would be this one. If the caller leaves, it completes and then the request is aborted.
            outputs = await asyncio.shield(receive)
        except BaseException:
            caller_left.set()
            receive.add_done_callback(lambda _: self._commands.put(lambda: self._abort(rid)))
            raise
        async for out in self._stream(rid, outputs):
            yield out

    async def _receive(self, handoff: KVHandoff, params: SamplingParams | None, prefill: KVSource,
                       caller_left: asyncio.Event) -> asyncio.Queue:
        rid = handoff.request_id
        try:
            grammar = await self._compile_grammar(params)
            async with self._transfer_lock(handoff.source):
                outputs, commands = await self._admit_prefilled(handoff, params, grammar, caller_left)
                started = time.monotonic()
                received = 0 if commands is None else await self._move_kv(prefill, rid, commands)
                took = time.monotonic() - started
                await self._call(lambda: self._start_prefilled(handoff, received, took))
            return outputs
        finally:
            await release_quietly(prefill, rid)

    async def _admit_prefilled(self, handoff: KVHandoff, params: SamplingParams | None,
                               grammar: "CompiledGrammar | None",
                               caller_left: asyncio.Event) -> tuple[asyncio.Queue, object]:
        """Allocates the prompt's blocks. While running requests hold them, it waits (up to half the prefill
        group's lease, and not after the caller left), trying again as soon as the engine frees blocks: a full
        cache is a queue here, as it is for prompts this group computes itself."""
        deadline = time.monotonic() + self.engine.config.cache.kv_lease_s / 2
        loop = asyncio.get_running_loop()
        while True:
            room = asyncio.Event()
            try:
                return await self._start(handoff.request_id,
                                         lambda: self._prepare_receive(handoff, params, grammar, (loop, room)))
            except KVCacheFullError:
                if time.monotonic() >= deadline or caller_left.is_set():
                    raise
            waits = [asyncio.ensure_future(room.wait()), asyncio.ensure_future(caller_left.wait())]
            await asyncio.wait(waits, timeout=min(_ROOM_RETRY_S, max(0.0, deadline - time.monotonic())),
                               return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._abort(request_id))

    async def stats(self) -> EngineStats:
        return await self._call(self._read_stats)

    async def load_adapter(self, name: str, folder: str) -> None:
        """A LoRA adapter loaded between steps as a request naming it with its folder would load it
        (adapter_cache.py); raises LoRAError for a folder that is not an adapter of this model."""
        await self._call(lambda: self.engine.load_adapter(name, folder))

    async def unique_prefixes(self, held_elsewhere: set[BlockHash]) -> list[Prefix]:
        return await self._call(lambda: self.engine.unique_prefixes(held_elsewhere))

    async def check_health(self) -> EngineStats:
        """Raises once the group is broken; an answer at all shows the engine thread is alive. The answer is the
        group's stats, so a caller that weighs the group by its load learns both in one call."""
        stats = await self._call(self._read_stats)
        self.check_broken()
        return stats

    def check_broken(self) -> None:
        """Raises once the group is broken; readable from any thread, without waiting for the engine."""
        if self.broken is not None:
            raise RuntimeError(f"worker group out of service: {self.broken}")

    def busy_s(self) -> float:
        """Seconds the engine thread has gone without progress in its current step or command: since it began,
        or since the model last finished a layer, whichever is later; 0 while it waits for work. Readable from any
        thread, so a step that never ends (a stuck kernel, a collective waiting on a rank that stopped) shows here
        while every call that waits for the engine hangs (workers/stall_watch.py), and a step that is merely long
        (a long prefill on a CPU) does not."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - max(since, self.engine.runner.last_progress)

    def load(self) -> dict[str, int]:
        """The group's load as of its last step, readable from any thread without waiting for the engine (the
        KV-event publisher reports it to the routers every second)."""
        return self._load

    def _read_stats(self) -> EngineStats:
        eng = self.engine
        sched, bm = eng.scheduler, eng.block_manager
        return EngineStats(len(sched.running), len(sched.waiting), bm.num_free_blocks, bm.num_blocks,
                           len(eng.pinned), len(eng.receiving), len(eng.kv.channels), eng.kv.bytes_sent,
                           eng.kv.bytes_received, eng.num_transfer_failures, sched.num_queued_prefill_tokens(),
                           eng.num_finished,
                           eng.num_prompt_tokens, eng.num_cached_prompt_tokens, eng.num_computed_prompt_tokens,
                           eng.num_steps, eng.step_seconds, eng.num_guessed_tokens, eng.num_accepted_guesses,
                           eng.num_generated_tokens, eng.num_lora_adapters, eng.adapters.num_loads,
                           eng.adapters.num_drops, bm.host.num_blocks if bm.host else 0, len(bm.host or ()),
                           bm.num_offloaded_blocks, bm.num_reloaded_blocks)

    def _update_load(self) -> None:
        stats = self._read_stats()
        self._load = {"running_seqs": stats.num_running, "queued_prefill_tokens": stats.num_queued_prefill_tokens,
                      "free_blocks": stats.num_free_blocks, "total_blocks": stats.num_blocks,
                      "waiting_seqs": stats.num_waiting, "pinned_seqs": stats.num_pinned,
                      "busy_seqs": stats.num_busy_seqs,
                      "finished": stats.num_finished,
                      "prompt_tokens": stats.num_prompt_tokens, "cached_prompt_tokens": stats.num_cached_prompt_tokens,
                      "computed_prompt_tokens": stats.num_computed_prompt_tokens,
                      "generated_tokens": stats.num_generated_tokens,
                      "kv_bytes_sent": stats.kv_bytes_sent, "kv_bytes_received": stats.kv_bytes_received,
                      "kv_transfer_failures": stats.num_kv_transfer_failures,
                      "guessed_tokens": stats.num_guessed_tokens, "accepted_guesses": stats.num_accepted_guesses,
                      "lora_adapters": stats.num_lora_adapters, "lora_loads": stats.num_lora_loads,
                      "lora_drops": stats.num_lora_drops, "host_blocks": stats.num_host_blocks,
                      "host_blocks_used": stats.num_host_blocks_used, "offloaded_blocks": stats.num_offloaded_blocks,
                      "reloaded_blocks": stats.num_reloaded_blocks}

    def _wake_room_waiters(self) -> None:
        """Wakes the prefilled requests waiting for blocks once more are free than at the end of the last
        iteration: they registered during this one, so nothing freed after their try goes unnoticed."""
        free = self._load["free_blocks"]
        if free > self._free_blocks:
            for loop, room in self._room_waiters:
                with contextlib.suppress(RuntimeError):  # that waiter's event loop has closed
                    loop.call_soon_threadsafe(room.set)
            self._room_waiters.clear()
        self._free_blocks = free

    def shutdown(self) -> None:
        """Stops the engine thread after it releases the group's other ranks and closes its KV channels."""
        def stop() -> None:
            self._stopped = True
            self.engine.shutdown()

        self._commands.put(stop)
        self._thread.join(timeout=10)
        self._grammar_threads.shutdown(wait=False, cancel_futures=True)

    async def _compile_grammar(self, params: SamplingParams | None) -> "CompiledGrammar | None":
        """The request's structured output compiled on a grammar thread while the engine steps the others; None
        when it has none."""
        if params is None or params.structured_output is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(self._grammar_threads, self.engine.compile_grammar,
                                                                params.structured_output)

    # -- inside the engine thread, and the plumbing to reach it ----------------------------------------------

    async def _start(self, request_id: str, add: Callable) -> tuple[asyncio.Queue, object]:
        """Runs `add` on the engine thread and opens the request's output stream in the same command, so no
        output can come before the stream. Returns the stream's queue and what `add` returned."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def run():
            if self._early_aborts.pop(request_id, None) is not None:
                raise RequestFailedError(f"request {request_id} was cancelled before it started")
            if self.broken is not None:
                raise RequestFailedError(f"this worker group is out of service ({self.broken}); retry elsewhere")
            result = add()
            self._streams[request_id] = (loop, outputs)
            return result

        try:
            result = await self._call(run)
        except asyncio.CancelledError:
            # Commands run in order, so this abort lands after the add it races with.
            self._commands.put(lambda: self._abort(request_id))
            raise
        return outputs, result

    async def _stream(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.error is not None:  # its step failed: the caller gets an error, not a short completion
                    raise RequestFailedError(out.error)
                yield out
        finally:
            if not finished:
                self._commands.put(lambda: self._abort(request_id))

    def _prepare_receive(self, handoff: KVHandoff, params: SamplingParams | None,
                         grammar: "CompiledGrammar | None", waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event]):
        """Allocates the blocks; when they are not free, `waiter` is woken once some are (see _update_load)."""
        try:
            plan = self.engine.add_prefilled_request(handoff, params, grammar)
        except KVCacheFullError:
            self._room_waiters.append(waiter)
            raise
        return self.engine.plan_transfer(handoff, plan) if plan.src_block_ids else None

    def _transfer_lock(self, source: object) -> asyncio.Lock:
        # asyncio locks belong to one event loop; servers have one, tests may run several in turn.
        return self._transfer_locks[(asyncio.get_running_loop(), source)]

    async def _move_kv(self, prefill: KVSource, request_id: str, plan: TransferPlan) -> int | None:
        """Rank 0's bytes received, or None when the KV did not arrive. Opening a channel is a rendezvous, so both
        halves start together; on an open channel the transfer goes in order: start the send (the sender never
        waits), then receive."""
        try:
            if plan.open_send is not None:
                # Opening is a rendezvous that holds this engine until the peer joins or the timeout passes: make
                # sure the peer is there first, so a dead prefill group costs one quick call, not a stalled engine.
                await prefill.check_health()
                results = await asyncio.gather(prefill.send_kv(plan.open_send), self._run(plan.open_recv),
                                               return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            await prefill.send_kv(plan.send)
            return await self._run(plan.recv)
        except TransferRefused as e:  # nothing was sent: the channel is fine
            logger.warning("prefill group refused the KV of %s (%s); recomputing its prompt here", request_id, e)
        except Exception as e:  # a TransferError, or the prefill group is gone
            logger.warning("KV transfer of %s from %s failed (%s: %s); recomputing its prompt here", request_id,
                           plan.recv.peer, type(e).__name__, e)
            await self._run(DropChannel(plan.recv.peer))
        return None

    def _run(self, command: KVCommand) -> Awaitable[int]:
        return self._call(lambda: self.engine.transfer_kv(command))

    def _start_prefilled(self, handoff: KVHandoff, received: int | None, transfer_s: float) -> None:
        """`received`: the bytes that arrived (0 when this group held the whole prompt), None if the KV did not."""
        request_id = handoff.request_id
        if request_id not in self.engine.receiving:
            return  # aborted while the KV was moving
        metrics = self.engine.requests[request_id].metrics
        # Rank 0's bytes; every rank moves an equal shard of the blocks.
        metrics.kv_transfer_s, metrics.kv_transfer_bytes = transfer_s, (received or 0) * self.engine.tp.size
        if received is not None:
            self._deliver(self.engine.start_prefilled_request(handoff))
        else:
            self.engine.recompute_prefilled_request(request_id)

    async def _call(self, fn: Callable):
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up before the command ran; skipping it keeps the engine unchanged
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, who re-raises it
                if isinstance(e, GroupBrokenError):  # e.g. a follower died while rank 0 sent it a KV command
                    self._break(str(e))
                future.set_exception(e)

        self._commands.put(run)
        return await asyncio.wrap_future(future)

    def _abort(self, request_id: str) -> None:
        if request_id not in self.engine.requests and request_id not in self.engine.pinned:
            self._remember_early_abort(request_id)
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(out)

    def _remember_early_abort(self, request_id: str) -> None:
        now = time.monotonic()
        for rid in [rid for rid, at in self._early_aborts.items() if now - at > _EARLY_ABORT_TTL_S]:
            del self._early_aborts[rid]
        self._early_aborts[request_id] = now

    def _loop(self) -> None:
        while not self._stopped:
            try:
                command = self._commands.get(timeout=self._idle_timeout())
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    with self._busy():
                        command()
                except Exception:  # a command must never take the engine thread down with it
                    logger.exception("engine command failed")
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            self.engine.expire_leases()
            if self.engine.has_unfinished_requests() and self.broken is None:
                with self._busy():
                    self._step()
            self._update_load()
            self._wake_room_waiters()

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def _idle_timeout(self) -> float | None:
        """How long to wait for a command: not at all while requests run, until the next lease ends while blocks
        are pinned (so an unclaimed lease frees its blocks on time even on an idle engine), else forever."""
        if self.engine.has_unfinished_requests():
            return 0
        expiry = self.engine.next_lease_expiry()
        return None if expiry is None else max(0.0, expiry - time.monotonic())

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if self.engine.tp.size > 1:
                logger.exception("a step of this tensor-parallel group failed")
                self._break(error)
                return
            # A step that raises fails the requests it was running; everyone else keeps being served.
            logger.exception("engine step failed; failing the running requests")
            outputs = [self.engine.fail_request(s.request_id, error) for s in list(self.engine.scheduler.running)]
        for out in outputs:
            self._deliver(out)

    def _break(self, error: str) -> None:
        """A rank that fails mid-step (or a peer that died) leaves the group's collectives out of step: nothing
        it does next can be trusted, so everything it holds fails and Serve replaces the group."""
        logger.error("tensor-parallel group out of service: %s", error)
        self.broken = error
        for rid in list(self.engine.requests):
            out = self.engine.fail_request(rid, error)
            if out is not None:
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


async def release_quietly(prefill: KVSource, request_id: str) -> None:
    """Unpin on the prefill side; if that group is gone, its lease or its death freed the blocks anyway."""
    try:
        await prefill.release(request_id)
    except Exception as e:
        logger.warning("could not release %s on its prefill group: %s", request_id, e)
