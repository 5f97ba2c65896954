"""The token ids behind the prefix cache's chains, so a group that is going away can hand them to another.

The block manager knows its cached blocks only by hash, and a hash cannot be turned back into tokens. A replica
that Serve scales down still holds prefixes no other group has; to move them it must send them as requests,
so the engine remembers the full-block tokens of the sequences it finished lately. A chain that a later
sequence extends (a conversation's next turn) is dropped for the longer one, so a long conversation costs one
entry, not one per turn, and the oldest entries go once the tokens kept pass what the KV cache (and its host tier)
can hold.
"""

from array import array
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass

from workers.kv.hashing import BlockHash


@dataclass(frozen=True)
class Prefix:
    token_ids: list[int]  # whole blocks
    cache_salt: str | None
    lora: str | None = None  # the adapter whose KV the blocks hold
    lora_path: str | None = None  # its folder, for an adapter loaded while the cluster runs (adapter_cache.py)


@dataclass
class _Entry:
    token_ids: array  # 8 bytes a token, not a Python int object each
    block_hashes: list[BlockHash]
    cache_salt: str | None
    lora: str | None
    lora_path: str | None


class RecentPrefixes:
    def __init__(self, block_size: int, capacity_tokens: int):
        self.block_size = block_size
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[BlockHash, _Entry] = OrderedDict()  # by last block hash, oldest first
        self._num_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, token_ids: Sequence[int], block_hashes: Sequence[BlockHash], cache_salt: str | None,
               lora: str | None = None, lora_path: str | None = None) -> None:
        """A finished sequence's computed full blocks: `block_hashes` and the tokens they cover."""
        if not block_hashes:
            return
        for replaced in block_hashes:
            self._drop(self._entries.pop(replaced, None))
        self._entries[block_hashes[-1]] = entry = _Entry(array("l", token_ids[:len(block_hashes) * self.block_size]),
                                                         list(block_hashes), cache_salt, lora, lora_path)
        self._num_tokens += len(entry.token_ids)
        while self._num_tokens > self.capacity_tokens:
            self._drop(self._entries.popitem(last=False)[1])

    def _drop(self, entry: _Entry | None) -> None:
        if entry is not None:
            self._num_tokens -= len(entry.token_ids)

    def unique(self, cached: Container[BlockHash], held_elsewhere: Container[BlockHash]) -> list[Prefix]:
        """The prefixes, most recent first, that hold a block still `cached` here and neither `held_elsewhere`
        nor in a prefix already listed; each cut where this cache stops holding it."""
        listed: set[BlockHash] = set()
        prefixes = []
        for entry in reversed(self._entries.values()):
            num_cached = next((i for i, h in enumerate(entry.block_hashes) if h not in cached),
                              len(entry.block_hashes))
            held = entry.block_hashes[:num_cached]
            if any(h not in held_elsewhere and h not in listed for h in held):
                prefixes.append(Prefix(entry.token_ids[:num_cached * self.block_size].tolist(), entry.cache_salt,
                                       entry.lora, entry.lora_path))
                listed.update(held)
        return prefixes
