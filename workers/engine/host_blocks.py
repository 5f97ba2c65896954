"""The prefix cache's second tier: host-memory copies of cached blocks the KV cache had to evict.

A device block that holds a cached prefix is overwritten as soon as the free queue hands it out, and the next
request with that prefix computes it again. With `kv_offload_gb` the block manager first copies such a block into
a slot of a host-memory pool (pinned memory on a GPU; on a CPU, simply more memory than the KV cache was given)
and remembers it here by hash; a later request whose prefix continues into these hashes gets fresh device blocks
with the KV copied back, which costs a memory copy rather than the model's forward pass over those tokens. This is
what vLLM's KV offloading, SGLang's hierarchical cache and Dynamo's KV block manager do to stretch the cache.

Torch-free, like the block manager: which slot holds which hash, and which goes first when the pool is full
(least recently stored or reloaded). The copies themselves run on every rank (ModelRunner.copy_blocks).
"""

from collections import OrderedDict
from collections.abc import Container, Iterator

from workers.kv.hashing import BlockHash


class HostBlocks:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._slots: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self._unused = list(range(num_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._slots

    def __iter__(self) -> Iterator[BlockHash]:
        return iter(self._slots)

    def touch(self, block_hash: BlockHash) -> int:
        """The slot holding `block_hash`, now the most recently used."""
        self._slots.move_to_end(block_hash)
        return self._slots[block_hash]

    def take(self, block_hash: BlockHash, keep: Container[BlockHash] = ()) -> tuple[int | None, BlockHash | None]:
        """A slot for a new copy of `block_hash`, and the hash whose copy it drops (None while slots are unused).
        Hashes in `keep` are not dropped (their copies are still to be read); when nothing else can be, there is
        no slot: (None, None)."""
        if self._unused:
            slot, dropped = self._unused.pop(), None
        else:
            dropped = next((h for h in self._slots if h not in keep), None)
            if dropped is None:
                return None, None
            slot = self._slots.pop(dropped)
        self._slots[block_hash] = slot
        return slot, dropped

    def clear(self) -> None:
        self._slots.clear()
        self._unused = list(range(self.num_blocks - 1, -1, -1))
