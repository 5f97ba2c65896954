"""A tensor-parallel worker group on Ray: one actor per rank, packed into one placement group.

    group = WorkerGroup.start(EngineConfig(...), tensor_parallel_size=2)
    async for out in group.generate("Hello", SamplingParams(max_tokens=16)):
        ...

Starting a group: reserve one bundle per rank (STRICT_PACK: one node, so the ranks' collectives stay local; one
GPU per rank on GPU, a fraction of a CPU on CPU), start the rank actors (workers/rank.py) in their bundles, let
rank 0 open a TCPStore on a port the OS picks and hand its address to the others, and build the process group
from it: gloo on CPU; on GPU NCCL for the model's collectives plus gloo for rank 0's step plans. Rank 0 then runs
the engine (scheduler, sampler, AsyncLLMEngine); the other ranks run their follower loop until rank 0 stops them.

`WorkerGroup` has AsyncLLMEngine's methods, so servers use a group exactly like an in-process engine, and it is
small and picklable: a decode group's rank 0 receives the prefill group as an argument and pulls KV from it. A
request's stream leaves rank 0 as deltas (`RequestOutput.as_delta`: only the last output is whole), and stays so
through the pool's replica to the ingress, which puts it back together.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.engine.config import EngineConfig
from workers.engine.handoff import KVHandoff
from workers.engine.outputs import Continuation, RequestOutput
from workers.engine.recent_prefixes import Prefix
from workers.engine.sampling_params import SamplingParams
from workers.engine.stats import EngineStats
from workers.kv.hashing import BlockHash
from workers.kv_commands import KVCommand
from workers.kv_events import KVEventsTarget
from workers.rank import RENDEZVOUS_TIMEOUT_S, RankWorker

logger = logging.getLogger(__name__)


class WorkerGroup:
    def __init__(self, ranks: list, follower_loops: list, own_placement_group: PlacementGroup | None):
        self.ranks = ranks
        self._follower_loops = follower_loops
        self._own_placement_group = own_placement_group

    @classmethod
    def start(cls, config: EngineConfig, tensor_parallel_size: int = 1, num_cpus_per_rank: float = 1.0,
              progress: bool = False, kv_events: KVEventsTarget | None = None) -> "WorkerGroup":
        """Reserves the ranks' resources, starts them and waits until the model is loaded on every rank. With
        `kv_events`, rank 0 publishes the group's prefix-cache changes to Redis under that group id.

        Inside a Serve replica whose deployment declares placement_group_bundles, the ranks take bundles 1..N of
        the replica's own placement group (bundle 0 is the replica); otherwise the group reserves its own."""
        size = tensor_parallel_size
        gpu = config.model.device.startswith("cuda")
        bundle = {"CPU": num_cpus_per_rank, **({"GPU": 1} if gpu else {})}
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) > size:
            pg, first_bundle, own = current, 1, None
        else:
            pg = own = placement_group([bundle] * size, strategy="STRICT_PACK")
            first_bundle = 0
            try:
                ray.get(pg.ready(), timeout=RENDEZVOUS_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise RuntimeError(f"could not reserve {size} x {bundle} on one node within "
                                   f"{RENDEZVOUS_TIMEOUT_S} s (Ray has {ray.available_resources()} free); lower "
                                   "num_cpus_per_rank or start Ray with more CPUs") from None
        actor = ray.remote(RankWorker)
        ranks = [actor.options(
            num_cpus=num_cpus_per_rank, num_gpus=1 if gpu else 0, name=rank_actor_name(kv_events, rank),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, first_bundle + rank)
        ).remote(config, rank, size, progress and rank == 0, kv_events) for rank in range(size)]
        try:
            address = ray.get(ranks[0].rendezvous_address.remote())
            ray.get([r.start.remote(address) for r in ranks])
        except Exception:
            for r in ranks:
                ray.kill(r)
            if own is not None:
                remove_placement_group(own)
            raise
        loops = [r.follow.remote() for r in ranks[1:]]
        logger.info("worker group up: %d rank(s) of %s on %s", size, config.model.model, config.model.device)
        return cls(ranks, loops, own)

    @property
    def _driver(self):
        return self.ranks[0]

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, cache_salt: str | None = None,
                       continuation: Continuation | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = self._driver.generate.options(num_returns="streaming").remote(prompt, params, request_id,
                                                                               cache_salt, continuation)
        async for out in self._stream(stream, request_id):
            yield out

    async def prefill(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None, cache_salt: str | None = None,
                      continuation: Continuation | None = None) -> KVHandoff:
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        try:
            return await _unwrap(self._driver.prefill.remote(prompt, params, request_id, cache_salt, continuation))
        except asyncio.CancelledError:
            # Leaving an actor call does not stop it: abort it there, or its blocks stay pinned for the lease.
            self._driver.abort.remote(request_id)
            raise

    async def embed(self, prompt: str | list[int], request_id: str | None = None, cache_salt: str | None = None,
                    lora: str | None = None, lora_path: str | None = None) -> RequestOutput:
        """An embedding request's final output (AsyncLLMEngine.embed), which carries the vector."""
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        try:
            return await _unwrap(self._driver.embed.remote(prompt, request_id, cache_salt, lora, lora_path))
        except asyncio.CancelledError:
            self._driver.abort.remote(request_id)  # as for prefill: the actor call runs on otherwise
            raise

    async def send_kv(self, command: KVCommand) -> int:
        return await _unwrap(self._driver.send_kv.remote(command))

    def claim(self, request_id: str) -> None:
        """Sent, not awaited (AsyncLLMEngine.claim): if the group is gone, so are the blocks."""
        self._driver.claim.remote(request_id)

    async def release(self, request_id: str) -> None:
        await _unwrap(self._driver.release.remote(request_id))

    async def generate_prefilled(self, handoff: KVHandoff, params: SamplingParams | None,
                                 prefill: "WorkerGroup") -> AsyncIterator[RequestOutput]:
        stream = self._driver.generate_prefilled.options(num_returns="streaming").remote(handoff, params, prefill)
        async for out in self._stream(stream, handoff.request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        await _unwrap(self._driver.abort.remote(request_id))

    async def stats(self) -> EngineStats:
        return await _unwrap(self._driver.stats.remote())

    async def load_adapter(self, name: str, folder: str) -> None:
        await _unwrap(self._driver.load_adapter.remote(name, folder))

    async def unique_prefixes(self, held_elsewhere: set[BlockHash]) -> list[Prefix]:
        """The prefixes this group should hand on before it goes (workers/engine/recent_prefixes.py)."""
        return await _unwrap(self._driver.unique_prefixes.remote(held_elsewhere))

    async def load(self) -> dict:
        """Rank 0's load as of its last step, with how long its current step has gone without progress (busy_s),
        answered without waiting for the step to end; raises as check_health does for a broken group."""
        await self._check_followers()
        return await _unwrap(self._driver.load.remote())

    async def check_health(self) -> EngineStats:
        """Raises unless rank 0 answers, the group is not broken and every follower is still in its loop; the
        group's stats otherwise (AsyncLLMEngine.check_health)."""
        await self._check_followers()
        return await _unwrap(self._driver.check_health.remote())

    async def _check_followers(self) -> None:
        ended = []
        if self._follower_loops:
            ended, _ = ray.wait(self._follower_loops, num_returns=len(self._follower_loops), timeout=0)
        if ended:
            await _unwrap(ended[0])  # raises the follower's error
            raise RuntimeError("a follower rank left its loop")

    def end_ranks(self) -> None:
        """Ends every rank now, without asking rank 0, which may not answer: the group's calls then fail as they
        do when its ranks die."""
        for r in self.ranks:
            ray.kill(r, no_restart=True)

    def shutdown(self) -> None:
        """Stops the followers through rank 0, then ends the actors and frees the reserved resources."""
        try:
            ray.get(self._driver.shutdown.remote(), timeout=30)
            ray.get(self._follower_loops, timeout=30)
        except Exception as e:  # a broken group still has to give its resources back
            logger.warning("worker group did not stop cleanly: %s", e)
        for r in self.ranks:
            ray.kill(r)
        if self._own_placement_group is not None:
            remove_placement_group(self._own_placement_group)

    async def _stream(self, stream, request_id: str) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            async for ref in stream:
                out = await _unwrap(ref)
                finished = out.finished
                yield out
        finally:
            if not finished:  # the caller went away, or the stream broke: free the request's blocks
                try:
                    self._driver.abort.remote(request_id)
                except Exception as e:
                    logger.warning("could not abort %s: %s", request_id, e)


def rank_actor_name(kv_events: KVEventsTarget | None, rank: int) -> str | None:
    """A pool replica's ranks are named after it (`ray list actors`, `ray.get_actor` find them by pool, replica
    and rank); a group outside Serve stays anonymous."""
    if kv_events is None:
        return None
    return f"{RANK_ACTOR_PREFIX}{kv_events.role}:{kv_events.group_id}:{rank}"


RANK_ACTOR_PREFIX = "tandem-rank:"


async def _unwrap(ref):
    """Awaits a Ray result, raising the engine's own exception (InvalidRequestError, ...) rather than Ray's
    wrapper, so callers map errors the same way for a group as for an in-process engine."""
    try:
        return await ref
    except RayTaskError as e:
        raise e.cause from None
