"""The routing decision: which decode group continues a request, and which group computes its prompt.

One continuous cost in token-equivalents decides everything. There is no threshold where all traffic swings to one
replica at once (the hot spots of switch-style routers); a cached prefix is worth exactly the compute it saves:

    load(g)         = queued_token x prefill tokens queued or running on g  +  running_seq x sequences g decodes
    prefill(g)      = compute_token x prompt tokens g would still compute (prompt minus its cached prefix)  +  load(g)
    remote(d)       = min over prefill groups p of prefill(p)  +  transfer_block x prompt blocks d lacks
    local(d)        = prefill(d) with local_compute_token per token (a local prefill also stalls d's decodes)
    serve(d)        = load(d)  +  kv_usage x d's KV usage with the prompt in  +  min(local(d), remote(d))

The decode group is the one with the lowest serve cost among those with free blocks for the whole prompt (if
none has room, the one with the most free blocks). It prefills the prompt itself when local(d) < remote(d):
conditional disaggregation, e.g. a multi-turn conversation whose history the decode group already holds. Ties go
to remote prefill, then to the group whose cache holds fewer blocks, then to the smaller group id, so a decision is
a pure function of its inputs. (On an idle pool every group ties on a new prefix; by id alone the first group took
each one, and one replica of four served half the tenants.)

Cached prefixes are counted as the engine uses them: whole blocks, and never the prompt's last token, which must
be computed to produce the first token's logits (workers/engine/block_manager.py).
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingWeights:
    """The cost's weights, in token-equivalents (compute_token is the unit)."""

    # One prompt token still to compute on a prefill group.
    compute_token: float = 1.0
    # One prefill token already queued or running on a group, ahead of this request. It weighs less than a token
    # to compute: a queued token delays only this request, while a token this request adds (a prefix computed
    # again on a replica that lacks it) delays every request queued behind it later and takes cache space twice.
    # Under load the second costs several times the first: at 1.0 the router gave up cache holders as soon as
    # their queue exceeded the prefix, and reached 67% of the oracle's hit rate in tandem bench routing; at 0.25,
    # 83%.
    queued_token: float = 0.25
    # One sequence a group is decoding: it takes a slot in every step's batch, so a busy group with an empty
    # prefill queue still loses to an idle one.
    running_seq: float = 8.0
    # One KV block moved from the prefill group to the decode group (a 16-token block moves in far less time
    # than its tokens take to compute).
    transfer_block: float = 1.0
    # One prompt token computed on the decode group itself: its compute plus the stall it causes the group's
    # running sequences. Raise it to prefer remote prefill, lower it towards compute_token to prefill locally.
    local_compute_token: float = 2.0
    # A decode group's KV cache going from empty to full (scaled by the fraction used once the prompt is in):
    # a fuller cache is closer to preempting sequences, which costs their whole recompute.
    kv_usage: float = 64.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"{f.name} must be >= 0 (got {value!r})")


@dataclass(frozen=True)
class GroupLoad:
    """What one group reports: its KV capacity and the work already on it."""

    group_id: str
    free_blocks: int
    total_blocks: int
    # Uncached prompt tokens of the requests queued or being prefilled there.
    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    held_blocks: int = 0  # blocks in its prefix cache, as the KV index knows them: the tie-break

    def __post_init__(self) -> None:
        if self.total_blocks < 1:
            raise ValueError(f"total_blocks must be >= 1 (got {self.total_blocks!r})")
        if not 0 <= self.free_blocks <= self.total_blocks:
            raise ValueError(f"free_blocks must be in [0, total_blocks={self.total_blocks}] (got {self.free_blocks!r})")
        if self.queued_prefill_tokens < 0 or self.running_seqs < 0 or self.held_blocks < 0:
            raise ValueError(f"queued_prefill_tokens, running_seqs and held_blocks must be >= 0 (got "
                             f"{self.queued_prefill_tokens!r}, {self.running_seqs!r}, {self.held_blocks!r})")


@dataclass(frozen=True)
class Cost:
    """One candidate's weighted cost terms; `total` is their sum."""

    group_id: str
    cached_blocks: int  # prompt blocks the group holds and would reuse
    compute: float = 0.0  # prompt tokens it would still compute
    queued: float = 0.0  # prefill tokens queued or running there
    decoding: float = 0.0  # sequences it decodes
    transfer: float = 0.0  # prompt blocks moved to the decode group
    kv_usage: float = 0.0  # how full the decode group's KV cache would be
    prefill: float = 0.0  # the cheaper way to get the prompt's KV onto the decode group (local or remote total)

    @property
    def total(self) -> float:
        return self.compute + self.queued + self.decoding + self.transfer + self.kv_usage + self.prefill

    def describe(self) -> str:
        terms = " ".join(f"{name}={getattr(self, name):g}" for name in _TERMS if getattr(self, name))
        return f"{self.group_id}(total={self.total:g} cached_blocks={self.cached_blocks}{' ' if terms else ''}{terms})"


_TERMS = ("compute", "queued", "decoding", "transfer", "kv_usage", "prefill")


@dataclass(frozen=True)
class RouteDecision:
    """The decision and every number behind it, for the log line and for export (metrics, traces)."""

    prefill_group: str | None  # None: the decode group prefills the prompt itself
    decode_group: str
    cached_blocks: int  # prompt blocks the prefilling group already holds
    local: Cost  # prefilling on the chosen decode group
    remote: Cost | None  # the best prefill group, including the transfer; None without prefill groups
    prefill_costs: tuple[Cost, ...]  # every prefill group, cheapest first
    decode_costs: tuple[Cost, ...]  # every decode group by serve cost, cheapest first, then those without room

    def describe(self) -> str:
        remote = self.remote.describe() if self.remote else "none"
        return (f"route prefill={self.prefill_group or 'local'} decode={self.decode_group} "
                f"cached_blocks={self.cached_blocks} local={self.local.describe()} remote={remote} "
                f"prefill_candidates=[{', '.join(c.describe() for c in self.prefill_costs)}] "
                f"decode_candidates=[{', '.join(c.describe() for c in self.decode_costs)}]")


def usable_cached_blocks(prompt_len: int, block_size: int, cached_blocks: int) -> int:
    """The cached prefix blocks the engine would reuse: whole blocks, always leaving the last token to compute."""
    return max(0, min(cached_blocks, (prompt_len - 1) // block_size))


def prefill_cost(load: GroupLoad, prompt_len: int, block_size: int, cached_blocks: int, weights: RoutingWeights,
                 compute_weight: float | None = None) -> Cost:
    """The cost of prefilling the prompt on `load`'s group; `compute_weight` defaults to compute_token."""
    cached = usable_cached_blocks(prompt_len, block_size, cached_blocks)
    per_token = weights.compute_token if compute_weight is None else compute_weight
    return Cost(load.group_id, cached, compute=per_token * (prompt_len - cached * block_size),
                queued=weights.queued_token * load.queued_prefill_tokens,
                decoding=weights.running_seq * load.running_seqs)


def rank_prefill(prompt_len: int, block_size: int, cached_blocks: Mapping[str, int], loads: Sequence[GroupLoad],
                 weights: RoutingWeights) -> tuple[Cost, ...]:
    """Every prefill group's cost, cheapest first (ties to the emptier cache, then by group id). `cached_blocks`
    maps a group id to its longest cached prefix of the prompt, in blocks; a missing group holds none."""
    held = {g.group_id: g.held_blocks for g in loads}
    costs = (prefill_cost(g, prompt_len, block_size, cached_blocks.get(g.group_id, 0), weights) for g in loads)
    return tuple(sorted(costs, key=lambda c: (c.total, held[c.group_id], c.group_id)))


def route(prompt_len: int, block_size: int, cached_blocks: Mapping[str, int], prefill_loads: Sequence[GroupLoad],
          decode_loads: Sequence[GroupLoad], weights: RoutingWeights = RoutingWeights()) -> RouteDecision:
    """Chooses the decode group and who prefills, and logs the decision with its cost terms (one INFO line).

    With no prefill groups (unified mode, or the prefill pool is down) the decode group prefills locally.
    """
    if prompt_len < 1 or block_size < 1:
        raise ValueError(f"prompt_len and block_size must be >= 1 (got {prompt_len!r}, {block_size!r})")
    if not decode_loads:
        raise ValueError("no decode group to route to")
    prefill_costs = rank_prefill(prompt_len, block_size, cached_blocks, prefill_loads, weights)
    best_prefill = prefill_costs[0] if prefill_costs else None
    prompt_blocks = -(-prompt_len // block_size)
    options = {d.group_id: _decode_option(d, prompt_len, block_size, cached_blocks.get(d.group_id, 0),
                                          best_prefill, weights) for d in decode_loads}
    fitting = sorted((d for d in decode_loads if d.free_blocks >= prompt_blocks),
                     key=lambda d: (options[d.group_id][0].total, d.held_blocks, d.group_id))
    crowded = sorted((d for d in decode_loads if d.free_blocks < prompt_blocks),
                     key=lambda d: (-d.free_blocks, d.group_id))
    decode_costs = tuple(options[d.group_id][0] for d in fitting + crowded)
    _, local, remote = options[decode_costs[0].group_id]
    prefill_group = None if remote is None or local.total < remote.total else remote.group_id
    cached = local.cached_blocks if prefill_group is None else remote.cached_blocks
    decision = RouteDecision(prefill_group, decode_costs[0].group_id, cached, local, remote, prefill_costs,
                             decode_costs)
    logger.info(decision.describe())
    return decision


def _decode_option(d: GroupLoad, prompt_len: int, block_size: int, cached_blocks: int, best_prefill: Cost | None,
                   weights: RoutingWeights) -> tuple[Cost, Cost, Cost | None]:
    """(serve cost, local prefill cost, remote prefill cost) of decoding on group `d`."""
    local = prefill_cost(d, prompt_len, block_size, cached_blocks, weights, weights.local_compute_token)
    prompt_blocks = -(-prompt_len // block_size)
    remote = None
    if best_prefill is not None:
        remote = Cost(best_prefill.group_id, best_prefill.cached_blocks, best_prefill.compute, best_prefill.queued,
                      best_prefill.decoding, transfer=weights.transfer_block * (prompt_blocks - local.cached_blocks))
    usage = (d.total_blocks - d.free_blocks + prompt_blocks) / d.total_blocks
    serve = Cost(d.group_id, local.cached_blocks, queued=local.queued, decoding=local.decoding,
                 kv_usage=weights.kv_usage * usage, prefill=min(local.total, remote.total) if remote else local.total)
    return serve, local, remote
