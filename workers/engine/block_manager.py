"""Paged KV bookkeeping: which physical block holds what, who uses it, and which free block goes first.

Torch-free on purpose: this is the part that must be exact, so it is tested exactly (block ids, ref counts,
eviction order). A free block keeps its contents and its hash until it is handed out again, which is what makes
automatic prefix caching free: a later request with the same block hash picks it up off the free queue.

With a host tier (host_blocks.py), a cached block about to be handed out is first copied to host memory, and a
later prefix that continues into copied blocks gets them copied back into fresh blocks. The copies are queued in
the order the bookkeeping decided them (`copies`), and the engine runs them on every rank before anything else
touches the cache, so a copy always reads what the bookkeeping says the block held at that point.

The hashes held on the device (`cached`) and in the host tier together are exactly what the router's KV index must
know about this group, so every change to that set is reported to an optional `KVEventSink` (workers/kv_events.py
publishes them to Redis).
"""

from collections import OrderedDict
from collections.abc import Container
from collections.abc import Sequence as Run
from dataclasses import dataclass
from itertools import takewhile
from typing import Literal, Protocol

from workers.engine.host_blocks import HostBlocks
from workers.engine.sequence import Sequence
from workers.kv.hashing import BlockHash


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


# ("out", device block, host slot): save a block before it is handed out; ("in", host slot, device block): reload one.
BlockCopy = tuple[Literal["out", "in"], int, int]


class KVEventSink(Protocol):
    """Told, in order, every change to the set of cached block hashes. Called on the engine thread, so it must
    not block (workers/kv_events.py only enqueues)."""

    def blocks_stored(self, block_hashes: list[BlockHash], parent_hash: BlockHash | None) -> None:
        """`block_hashes` are consecutive blocks of one sequence; `parent_hash` is the block before the first."""

    def blocks_removed(self, block_hashes: list[BlockHash]) -> None:
        """The blocks were evicted: their physical blocks now hold other content."""

    def cache_cleared(self) -> None:
        """Every cached hash was forgotten at once."""


class BlockManager:
    """Allocates KV blocks to sequences with automatic prefix caching.

    The free queue is an OrderedDict used as an O(1) LRU list: the front is evicted first. Freed blocks that hold
    a cached prefix go to the back (most recently used); blocks with nothing reusable go to the front. A cached
    block that is hit while free leaves the queue from the middle, also in O(1).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 kv_events: KVEventSink | None = None, num_host_blocks: int = 0):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.kv_events = kv_events
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self.host = HostBlocks(num_host_blocks) if enable_prefix_caching and num_host_blocks > 0 else None
        self.copies: list[BlockCopy] = []  # decided, not yet run (take_copies)
        # Running totals, for metrics: blocks saved to the host tier, and blocks reloaded from it.
        self.num_offloaded_blocks = 0
        self.num_reloaded_blocks = 0

    def __contains__(self, block_hash: object) -> bool:
        """Whether the group holds the block, on the device or in the host tier."""
        return block_hash in self.cached or (self.host is not None and block_hash in self.host)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, including cached ones that would be evicted."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def cacheable_hashes(self, seq: Sequence) -> list[BlockHash]:
        """The hashes of the full blocks the sequence may take from the cache, in order.

        At least one token is always left to compute: the model must run on the last token to produce logits. A
        request that asks for prompt logprobs takes nothing: it needs the logits of every prompt position.
        """
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        return seq.block_hashes[:(seq.num_tokens - 1) // self.block_size]

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """The longest run of the sequence's cacheable blocks already in the cache."""
        hits = []
        for block_hash in self.cacheable_hashes(seq):
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def get_offloaded_blocks(self, seq: Sequence, num_computed_blocks: int) -> list[BlockHash]:
        """The run of the sequence's cacheable blocks after its first `num_computed_blocks` that the host tier holds
        (and the device does not), to be reloaded rather than computed."""
        if self.host is None:
            return []
        rest = self.cacheable_hashes(seq)[num_computed_blocks:]
        return list(takewhile(lambda h: h in self.host and h not in self.cached, rest))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, new_computed_blocks: list[int] = (),
                       reloaded: Run[BlockHash] = ()) -> bool:
        """Make the block table cover `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` (prefix-cache hits of a newly admitted sequence) are shared, not copied; `reloaded`
        (get_offloaded_blocks, right after them) get fresh blocks that the host tier's copies are copied into.
        Returns False and changes nothing when the free blocks do not suffice.
        """
        num_computed = seq.num_computed_tokens + (len(new_computed_blocks) + len(reloaded)) * self.block_size
        num_required = -(-(num_computed + num_new_tokens) // self.block_size)
        num_to_allocate = num_required - len(seq.block_table) - len(new_computed_blocks)
        num_hits_on_free = sum(1 for b in new_computed_blocks if self.blocks[b].ref_count == 0)
        if num_to_allocate + num_hits_on_free > self.num_free_blocks:
            return False
        for block_id in new_computed_blocks:
            self._touch(block_id)
        seq.block_table.extend(new_computed_blocks)
        evicted: list[BlockHash] = []
        to_read = set(reloaded)
        for block_hash in reloaded:
            # Each reload is queued right after its block is taken: a later offload may reuse its slot.
            block_id = self._pop_free(evicted, keep=to_read)
            self._reload(block_id, block_hash)
            to_read.discard(block_hash)
            seq.block_table.append(block_id)
        seq.block_table.extend(self._pop_free(evicted) for _ in range(num_to_allocate - len(reloaded)))
        if evicted and self.kv_events is not None:
            self.kv_events.blocks_removed(evicted)
        return True

    def take_copies(self) -> list[BlockCopy]:
        """The copies decided since the last call, in order; they must run before the cache is next read or
        written."""
        copies, self.copies = self.copies, []
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every block whose tokens are all computed under its hash, so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        stored: list[int] = []
        for index, (block_id, block_hash) in enumerate(zip(seq.block_table[:num_full], seq.block_hashes[:num_full])):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                continue
            if block_hash in self.cached:
                # Another sequence computed the same block at the same time; keep the first copy as the cached one.
                continue
            block.block_hash = block_hash
            self.cached[block_hash] = block_id
            if self.host is None or block_hash not in self.host:  # else the group held it already
                stored.append(index)
        if stored and self.kv_events is not None:
            self._report_stored(seq.block_hashes, stored)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first, so a prefix outlives its own suffix in the cache."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change); blocks in use keep their contents."""
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.host is not None:
            self.host.clear()
        if self.kv_events is not None:
            self.kv_events.cache_cleared()

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self, evicted: list[BlockHash], keep: Container[BlockHash] = ()) -> int:
        """The front free block. A cached hash it held leaves the device for the host tier, whose copy may displace
        another (never one in `keep`); what leaves the group altogether (that hash, without room in the host tier,
        or the displaced one, unless the device holds it) is appended to `evicted`."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            if not self._offload(block, evicted, keep):
                evicted.append(block.block_hash)
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _offload(self, block: Block, evicted: list[BlockHash], keep: Container[BlockHash]) -> bool:
        """Whether the host tier holds the block's content now (copied before, or queued to be)."""
        if self.host is None:
            return False
        if block.block_hash in self.host:
            self.host.touch(block.block_hash)
            return True
        slot, dropped = self.host.take(block.block_hash, keep)
        if slot is None:
            return False
        if dropped is not None and dropped not in self.cached:
            evicted.append(dropped)
        self.copies.append(("out", block.block_id, slot))
        self.num_offloaded_blocks += 1
        return True

    def _reload(self, block_id: int, block_hash: BlockHash) -> None:
        """A fresh block gets the host tier's copy of `block_hash` and is cached under it, like a computed one."""
        self.blocks[block_id].block_hash = block_hash
        self.cached[block_hash] = block_id
        self.copies.append(("in", self.host.touch(block_hash), block_id))
        self.num_reloaded_blocks += 1

    def _report_stored(self, block_hashes: list[BlockHash], indices: list[int]) -> None:
        """One event per run of consecutive blocks, so each event's parent hash is the block right before it."""
        start = 0
        for end in range(1, len(indices) + 1):
            if end == len(indices) or indices[end] != indices[end - 1] + 1:
                first, last = indices[start], indices[end - 1]
                parent = block_hashes[first - 1] if first else None
                self.kv_events.blocks_stored(block_hashes[first:last + 1], parent)
                start = end
