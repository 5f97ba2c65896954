"""A pool replica: one Serve replica owns one tensor-parallel worker group.

The same class serves both pools (one engine, two roles): the prefill pool's replicas answer `prefill`, the
decode pool's answer `generate_prefilled` (and `generate` in unified mode); either answers `embed`. The group's
ranks live in the replica's own placement group, so Serve reserves a replica's GPUs together, and they go when the
replica goes.

Only requests travel through Serve. KV blocks move between the groups' ranks over their own channels, and the
decode group reaches the prefill group that holds a request's KV through that group's handle, which `prefill`
returns with the handoff, so Serve never routes a transfer to the wrong replica.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from router.routing_hint import OUT_OF_SERVICE
from workers.caller_watch import Caller, CallerWatch
from workers.engine.config import EngineConfig
from workers.engine.handoff import KVHandoff
from workers.engine.outputs import Continuation, RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.engine.stats import EngineStats
from workers.group import WorkerGroup
from workers.kv_events import KVEventsTarget
from workers.prefix_handoff import hand_off_prefixes
from workers.replica_logging import use_serve_logging
from workers.stall_watch import StallWatch

logger = logging.getLogger(__name__)

# Rank 0 answers its load beside the engine thread, in milliseconds: no answer this soon means its process is
# stopped or gone.
_LOAD_TIMEOUT_S = 5.0


class AutoscalingSignals:
    """A replica's load as rates over the time since the previous report: its prefill speed is measured, not
    configured, so the autoscaler turns queued tokens into seconds of backlog on this hardware and model."""

    def __init__(self):
        self._previous: EngineStats | None = None
        self.prefill_tokens_per_s: float | None = None  # while busy; kept from the last interval that computed any
        self.step_s: float | None = None  # mean step time: the inter-token latency of its decoding requests

    def update(self, stats: EngineStats) -> dict[str, float]:
        if self._previous is not None:
            busy = stats.step_seconds - self._previous.step_seconds
            computed = stats.num_computed_prompt_tokens - self._previous.num_computed_prompt_tokens
            steps = stats.num_steps - self._previous.num_steps
            if busy > 0 and computed > 0:
                self.prefill_tokens_per_s = computed / busy
            if steps > 0:
                self.step_s = busy / steps
        self._previous = stats
        signals = {"queued_prefill_tokens": float(stats.num_queued_prefill_tokens), "kv_usage": stats.kv_usage,
                   "running_seqs": float(stats.num_running + stats.num_waiting)}
        if self.prefill_tokens_per_s is not None:
            signals["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        if self.step_s is not None:
            signals["step_s"] = self.step_s
        return signals


@dataclass(frozen=True)
class Prefilled:
    """What a prefill replica returns: the handoff and the group that holds the KV under its lease."""

    handoff: KVHandoff
    source: WorkerGroup


class EngineServer:
    def __init__(self, config: EngineConfig, tensor_parallel_size: int = 1, num_cpus_per_rank: float = 1.0,
                 role: str = "decode", redis_url: str | None = None, step_timeout_s: float = 60.0):
        """With `redis_url` the group publishes its KV events under this replica's id, the id the request
        router sees the replica by. A group whose step runs longer than `step_timeout_s` is ended as hung
        (workers/stall_watch.py)."""
        use_serve_logging()
        self.role = role
        replica_id = serve.get_replica_context().replica_id.unique_id
        kv_events = KVEventsTarget(redis_url, replica_id, role) if redis_url else None
        self._kv_events = kv_events
        self.group = WorkerGroup.start(config, tensor_parallel_size, num_cpus_per_rank, kv_events=kv_events)
        self._signals = AutoscalingSignals()
        self._callers = CallerWatch(self.group.abort)
        self._stalls = StallWatch(self.group.load, self.group.end_ranks, step_timeout_s)
        logger.info("%s replica %s ready: tensor parallel size %d", role, replica_id, tensor_parallel_size)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None,
                       continuation: Continuation | None = None, routing: object = None,
                       caller: Caller | None = None) -> AsyncIterator[RequestOutput]:
        """`continuation`: the request's output so far, when the ingress moves it here from a group that was lost
        (LLMEngine.add_request). `caller`, here and in generate_prefilled: the ingress replica streaming it, whose
        death aborts the request (workers/caller_watch.py)."""
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        async with self._callers.watching(caller, request_id), self._stalls.watching():
            async for out in self.group.generate(prompt, params, request_id, cache_salt, continuation):
                yield out

    async def prefill(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None, cache_salt: str | None = None,
                      continuation: Continuation | None = None, routing: object = None) -> Prefilled:
        """`routing`, here and below, is the request router's hint (router/request_router.py); the replica has
        no use for it. `continuation` as for generate: the handoff then carries it, with the KV of its tokens."""
        async with self._stalls.watching():
            return Prefilled(await self.group.prefill(prompt, params, request_id, cache_salt, continuation),
                             self.group)

    async def embed(self, prompt: str | list[int], request_id: str | None = None, cache_salt: str | None = None,
                    lora: str | None = None, lora_path: str | None = None, routing: object = None) -> RequestOutput:
        """An embedding request, on either pool (the prefill pool's, where there is one): a prompt computed like
        any other, whose final output carries its vector instead of a token."""
        async with self._stalls.watching():
            return await self.group.embed(prompt, request_id, cache_salt, lora, lora_path)

    async def generate_prefilled(self, handoff: KVHandoff, params: SamplingParams | None, source: WorkerGroup,
                                 routing: object = None, caller: Caller | None = None) -> AsyncIterator[RequestOutput]:
        async with self._callers.watching(caller, handoff.request_id), self._stalls.watching():
            async for out in self.group.generate_prefilled(handoff, params, source):
                yield out

    async def abort(self, request_id: str) -> None:
        await self.group.abort(request_id)

    async def load_adapter(self, name: str, folder: str) -> None:
        """The ingress's check of a LoRA adapter it is asked to load while the cluster runs: this group loads it
        (the others will when a request names it)."""
        await self.group.load_adapter(name, folder)

    async def stats(self):
        return await self.group.stats()

    async def record_routing_stats(self) -> dict[str, float]:
        """The load the request router weighs this replica by, polled by Serve every second, as of the group's
        last step (answered without waiting for the current one); its sequences are all the group holds work for
        (EngineStats.num_busy_seqs). A group that lost a rank, or that may hang (rank 0 does not answer, or its
        step has made no progress for a quarter of step_timeout_s), says it is out of service, so the router sends
        requests elsewhere while Serve's health check or the stall watch (workers/stall_watch.py) catches up."""
        try:
            load = await asyncio.wait_for(self.group.load(), _LOAD_TIMEOUT_S)
        except Exception:
            return {OUT_OF_SERVICE: 1.0}
        if load["busy_s"] > self._stalls.timeout_s / 4:
            return {OUT_OF_SERVICE: 1.0}
        return {"free_blocks": load["free_blocks"], "total_blocks": load["total_blocks"],
                "queued_prefill_tokens": load["queued_prefill_tokens"], "running_seqs": load["busy_seqs"]}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The signals cluster/autoscaling.py scales the pools by, polled by Serve; it averages each over its
        look-back window."""
        return self._signals.update(await self.group.stats())

    async def check_health(self) -> None:
        """Serve's health probe reaches the group: rank 0 must answer and every follower be in its loop."""
        await self.group.check_health()

    async def __del__(self):
        """Serve calls this on graceful shutdown, after in-flight requests drained: hand this group's unique
        prefixes to the pool's survivors (workers/prefix_handoff.py), then give the ranks back."""
        group = getattr(self, "group", None)
        if group is None:
            return
        if self._kv_events is not None and not self._stalls.stalled:  # an ended group has no prefixes to give
            try:
                await hand_off_prefixes(group, self._kv_events.redis_url, self._kv_events.group_id, self.role)
            except Exception:
                logger.exception("prefix hand-off failed; stopping without it")
        await asyncio.to_thread(group.shutdown)
