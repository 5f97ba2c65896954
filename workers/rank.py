"""One rank of a tensor-parallel worker group, as a Ray actor (workers/group.py starts them and drives rank 0).

Rank 0 runs the engine (scheduler, sampler, AsyncLLMEngine) and answers the group's calls; a request's stream
leaves its process as deltas (`RequestOutput.as_delta`: only the last output is whole). The other ranks run the
follower loop until rank 0 stops them.

torch and the engine are imported when a rank starts, not with this module: the pool replica that creates the
actors imports it too, and never runs a model, so it starts in 1.5 s instead of 4 (on the 2-core CI machine).
"""

import asyncio
import datetime
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import ray

from workers.engine.config import EngineConfig
from workers.engine.handoff import KVHandoff
from workers.engine.outputs import RequestOutput
from workers.engine.recent_prefixes import Prefix
from workers.engine.sampling_params import SamplingParams
from workers.engine.stats import EngineStats
from workers.kv.hashing import BlockHash
from workers.kv_commands import ChannelAddress, KVCommand
from workers.kv_events import KVEventPublisher, KVEventsTarget
from workers.replica_logging import use_rank_logging

if TYPE_CHECKING:
    import torch.distributed as dist

    from workers.engine.async_engine import AsyncLLMEngine, KVSource
    from workers.engine.follower import Follower

logger = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 300  # covers the slowest rank's model load: ranks join the group only after loading


class RankWorker:
    """One rank's process. Its async methods run on the actor's event loop; blocking work goes to a thread."""

    def __init__(self, config: EngineConfig, rank: int, size: int, progress: bool, kv_events: KVEventsTarget | None):
        use_rank_logging()
        self.config = config
        self.rank = rank
        self.size = size
        self.progress = progress
        self.kv_events = kv_events
        self._publisher: KVEventPublisher | None = None
        self._store: dist.TCPStore | None = None
        self.engine: AsyncLLMEngine | None = None
        self.follower: Follower | None = None

    def __repr__(self) -> str:
        # Ray's state API and dashboard name actors by their repr: say which pool and rank this process is.
        role = self.kv_events.role if self.kv_events is not None else "worker"
        return f"RankWorker({role} rank {self.rank} of {self.size})"

    def rendezvous_address(self) -> ChannelAddress:
        """Rank 0 hosts the group's store; the others connect to it."""
        from workers.kv_transfer import listen

        self._store, address = listen(ray.util.get_node_ip_address(), RENDEZVOUS_TIMEOUT_S, self.size)
        return address  # the store listens on the node's address only, not on every interface

    async def start(self, address: ChannelAddress) -> None:
        await asyncio.to_thread(self._start, address)

    def _start(self, address: ChannelAddress) -> None:
        import torch.distributed as dist

        from workers.engine.async_engine import AsyncLLMEngine
        from workers.engine.follower import Follower
        from workers.engine.llm_engine import LLMEngine
        from workers.engine.parallel import TensorParallel

        timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        store = self._store or dist.TCPStore(address.host, address.port, self.size, is_master=False,
                                             timeout=timeout)
        tp = TensorParallel()
        if self.size > 1:
            cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("tp-gloo", store), self.rank, self.size, timeout)
            group = cpu_group
            if self.config.model.device.startswith("cuda"):
                group = dist.ProcessGroupNCCL(dist.PrefixStore("tp-nccl", store), self.rank, self.size)
            tp = TensorParallel(self.rank, self.size, group, cpu_group)
        if tp.is_driver:
            if self.kv_events is not None:
                self._publisher = KVEventPublisher(self.kv_events.redis_url, self.kv_events.group_id)
                self._publisher.start()
            self.engine = AsyncLLMEngine(LLMEngine(self.config, self.progress, tp, self._publisher))
            if self._publisher is not None:
                self._publisher.role = self.kv_events.role
                self._publisher.load = self.engine.load
        else:
            self.follower = Follower(self.config, tp, self.progress)

    async def follow(self) -> None:
        """A follower's loop; returns when rank 0 stops the group. A follower that fails ends its process: rank 0
        would otherwise wait on it in a collective until the group's timeout, while its peers' sockets closing
        makes rank 0's step fail at once, which fails the group's requests and its health check."""
        try:
            await asyncio.to_thread(self.follower.run)
        except Exception:
            logger.exception("rank %d failed; ending its process so the group fails fast", self.rank)
            os._exit(1)

    # -- rank 0: the engine's interface ---------------------------------------------------------------------

    async def generate(self, prompt, params, request_id, cache_salt, continuation=None) -> AsyncIterator[RequestOutput]:
        async for out in _as_deltas(self.engine.generate(prompt, params, request_id, cache_salt, continuation)):
            yield out

    async def prefill(self, prompt, params, request_id, cache_salt, continuation=None) -> KVHandoff:
        return await self.engine.prefill(prompt, params, request_id, cache_salt, continuation)

    async def embed(self, prompt, request_id, cache_salt, lora=None, lora_path=None) -> RequestOutput:
        return await self.engine.embed(prompt, request_id, cache_salt, lora, lora_path)

    async def send_kv(self, command: KVCommand) -> int:
        return await self.engine.send_kv(command)

    def claim(self, request_id: str) -> None:
        self.engine.claim(request_id)

    async def release(self, request_id: str) -> None:
        await self.engine.release(request_id)

    async def generate_prefilled(self, handoff: KVHandoff, params: SamplingParams | None,
                                 prefill: "KVSource") -> AsyncIterator[RequestOutput]:
        async for out in _as_deltas(self.engine.generate_prefilled(handoff, params, prefill)):
            yield out

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def stats(self) -> EngineStats:
        return await self.engine.stats()

    async def load_adapter(self, name: str, folder: str) -> None:
        await self.engine.load_adapter(name, folder)

    async def unique_prefixes(self, held_elsewhere: set[BlockHash]) -> list[Prefix]:
        return await self.engine.unique_prefixes(held_elsewhere)

    async def load(self) -> dict:
        """The engine's load as of its last step and how long its current step has gone without progress (busy_s),
        answered beside the engine thread, not after the step: what the request routers weigh the group by, and
        what shows a step that hangs."""
        self.engine.check_broken()
        return {**self.engine.load(), "busy_s": self.engine.busy_s()}

    async def check_health(self) -> EngineStats:
        return await self.engine.check_health()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)


async def _as_deltas(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """A stream as it leaves rank 0's process: each output with only what is new, the last one whole."""
    first = True
    async for out in outputs:
        yield out.as_delta(first)
        first = False
