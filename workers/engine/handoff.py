"""What a prefill group hands a decode group: everything to continue a request except the KV tensors themselves,
which travel separately over a KV channel (workers/kv_transfer.py)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.kv.hashing import BlockHash
from workers.kv_commands import ChannelAddress

if TYPE_CHECKING:
    from workers.engine.outputs import Continuation


@dataclass(frozen=True)
class KVHandoff:
    request_id: str
    prompt_token_ids: list[int]
    first_token: int  # the first token it generated here
    first_logprobs: dict[int, float] | None  # the first token's top-N logprobs, when the request asked for them
    num_cached_tokens: int  # prompt tokens the prefill group took from its prefix cache
    block_ids: list[int]  # the prefill group's blocks holding the prompt's KV (and the continuation's), in order
    block_hashes: list[BlockHash]  # hashes of the full blocks among them, so the receiver can skip what it has
    cache_salt: str | None
    source: ChannelAddress  # where the decode group rendezvous with the prefill group to open a KV channel
    prefill_queue_s: float = 0.0  # the request's wait in the prefill group's scheduler, for its TTFT breakdown
    prefill_compute_s: float = 0.0  # its prompt's chunks and first token there
    # A request moved from a lost decode group: what its caller had received. The blocks hold the KV of its
    # tokens after the prompt's, and `first_token` is the token after them.
    continuation: "Continuation | None" = None


@dataclass(frozen=True)
class ReceivePlan:
    """Which of the handoff's blocks the decode group must receive, and into which of its own blocks; the first
    `num_cached_blocks` prompt blocks it already holds in its prefix cache and are not sent."""

    request_id: str
    num_cached_blocks: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
