"""Serve's replica choice for both pools, by prefix-cache-aware cost (router/policy.py).

Serve calls `choose_replicas` where it would otherwise pick two replicas at random, and keeps everything around
it: queue probing, back-off when a replica is full, autoscaling awareness. We only rank the candidates: the one
with the lowest cost first, the others after it in cost order, so a full replica falls through to the next.

The inputs: the prompt's block hashes (the ingress passes a `RoutingHint`), which groups hold which of them (a
KVIndex kept from Redis by a KVIndexFollower), and each replica's load (its `record_routing_stats`, refreshed
every second, plus what this router sent it, or ranked it first for, that has not finished yet, since the stats
lag a burst). The index
lags too: a prompt's blocks reach it only after the replica has computed them, which under load can be many
seconds after the request was routed. So the router also remembers the blocks of the prompts it sent, until each
request completes and then `_ROUTED_MEMORY_S` longer: a burst of requests on a new prefix, however long the queue
it waits in, follows the first one instead of scattering. In the
prefill pool the cost is the prompt tokens left to compute plus the queued work; in the decode pool it is the
decode load and KV usage plus the blocks the replica would still have to receive.
"""

import logging
import time
from collections import deque

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from router.kv_index import KVIndex, KVIndexFollower
from router.policy import GroupLoad, RoutingWeights, rank_prefill, route
from router.routing_hint import OUT_OF_SERVICE, RoutingHint
from workers.kv.hashing import BlockHash

logger = logging.getLogger(__name__)

_ROUTED_MEMORY_S = 5.0  # after completion: well past the index's lag (events reach Redis within a second)
# Serve ranks a burst of pending requests before it assigns any; a choice counts as load on its replica until the
# request is assigned (or this long, if it never is).
_CHOSEN_MEMORY_S = 10.0


class PrefixCacheRouter(RequestRouter):
    def initialize_state(self, redis_url: str, role: str = "prefill", block_size: int = 16,
                         weights: dict | None = None) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        self.role = role
        self.block_size = block_size
        self.weights = RoutingWeights(**(weights or {}))
        self.follower = KVIndexFollower(redis_url)
        self._started = False
        self._in_flight: dict[str, tuple[str, int]] = {}  # internal request id -> (replica, uncached tokens)
        self._chosen: dict[str, tuple[str, int, float]] = {}  # ranked, not yet assigned: (replica, tokens, until)
        self._routed = KVIndex()  # the blocks of prompts in flight or completed in the last _ROUTED_MEMORY_S
        self._routed_in_flight: dict[str, tuple[str, list[BlockHash]]] = {}  # request id -> (replica, hashes)
        self._routed_log: deque[tuple[float, str, list[BlockHash]]] = deque()  # (forget at, replica, hashes)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hint = _hint(pending_request)
        if hint is None:
            return [candidate_replicas]
        if not self._started:
            self._started = True
            await self.follower.start()  # the index is warm from Redis's snapshot when this returns
        # A group out of service (a rank died) comes last until Serve replaces it: the ingress moves its requests
        # to another group, which must not be that one again.
        serving = [r for r in candidate_replicas if not (r.routing_stats or {}).get(OUT_OF_SERVICE)]
        lost = [[r] for r in candidate_replicas if r not in serving] if serving else []
        by_id = {r.replica_id.unique_id: r for r in serving or candidate_replicas}
        cached = self._match(hint.block_hashes)
        loads = [self._load(group, replica) for group, replica in by_id.items()]
        if self.role == "prefill":
            ranked = rank_prefill(hint.num_tokens, self.block_size, cached, loads, self.weights)
            logger.info("prefill ranking for %d tokens: %s", hint.num_tokens,
                        "; ".join(cost.describe() for cost in ranked))
        else:  # route() logs the decision
            ranked = route(hint.num_tokens, self.block_size, cached, (), loads, self.weights).decode_costs
        best = ranked[0]
        self._chosen[pending_request.metadata.internal_request_id] = (
            best.group_id, max(1, hint.num_tokens - best.cached_blocks * self.block_size),
            time.monotonic() + _CHOSEN_MEMORY_S)
        return [[by_id[cost.group_id]] for cost in ranked] + lost

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        hint = _hint(pending_request)
        if hint is not None:
            group = replica_id.unique_id
            cached = self._match(hint.block_hashes).get(group, 0)
            uncached = max(1, hint.num_tokens - cached * self.block_size)
            request_id = pending_request.metadata.internal_request_id
            self._chosen.pop(request_id, None)
            self._in_flight[request_id] = (group, uncached)
            self._routed.add(group, hint.block_hashes)
            self._routed_in_flight[request_id] = (group, hint.block_hashes)

    def _match(self, block_hashes: list[BlockHash]) -> dict[str, int]:
        """Each group's cached prefix: what the index knows, or what this router sent it lately, if longer."""
        now = time.monotonic()
        while self._routed_log and self._routed_log[0][0] <= now:
            _, group, hashes = self._routed_log.popleft()
            self._routed.remove(group, hashes)
        known = self.follower.index.match(block_hashes)
        for group, blocks in self._routed.match(block_hashes).items():
            known[group] = max(known.get(group, 0), blocks)
        return known

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Serve calls this exactly once per routed request, however it ended."""
        self._in_flight.pop(internal_request_id, None)
        routed = self._routed_in_flight.pop(internal_request_id, None)
        if routed is not None:
            self._routed_log.append((time.monotonic() + _ROUTED_MEMORY_S, *routed))

    def _load(self, group: str, replica: RunningReplica) -> GroupLoad:
        stats = replica.routing_stats or {}
        now = time.monotonic()
        for request_id in [r for r, (_, _, until) in self._chosen.items() if until <= now]:
            del self._chosen[request_id]
        mine = [tokens for g, tokens in self._in_flight.values() if g == group]
        mine += [tokens for g, tokens, _ in self._chosen.values() if g == group]
        total = int(stats.get("total_blocks", 1)) or 1
        queued, running = int(stats.get("queued_prefill_tokens", 0)), int(stats.get("running_seqs", 0))
        # A request is in flight until its prefill ends (prefill pool) or its last token (decode pool); meanwhile it
        # holds a slot in the replica's batch, and in the prefill pool its uncached tokens are queued work.
        running = max(running, len(mine))
        if self.role == "prefill":
            queued = max(queued, sum(mine))
        return GroupLoad(group, free_blocks=int(stats.get("free_blocks", total)), total_blocks=total,
                         queued_prefill_tokens=queued, running_seqs=running,
                         held_blocks=self.follower.index.num_blocks(group))


def _hint(pending_request: PendingRequest | None) -> RoutingHint | None:
    if pending_request is None:
        return None
    hint = pending_request.kwargs.get("routing")
    return hint if isinstance(hint, RoutingHint) else None
