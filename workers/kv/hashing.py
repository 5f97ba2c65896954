"""Block hashes: the one name every part of Tandem uses for a block of KV.

A full block's hash chains its parent's hash with its token ids, so equal hashes mean equal prefixes, not just
equal blocks. The first block also folds in the request's `cache_salt`, which keeps tenants from ever sharing
(or probing) each other's cache, and its LoRA adapter, under which the same tokens have other KV. The engine's
prefix cache, KV events, the router's index and the transfer protocol all call this module, so the router knows
exactly which blocks a group holds.
"""

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes

_ROOT = b"tandem-kv-v1"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None = None,
                      lora: str | None = None) -> BlockHash:
    """SHA-256 over (parent hash or a root salted with cache_salt and the adapter's name, the block's token ids as
    little-endian uint32)."""
    h = hashlib.sha256()
    if parent is None:
        h.update(_ROOT)
        if cache_salt:
            h.update(_length_prefixed(cache_salt))
        if lora:
            h.update(b"lora" + _length_prefixed(lora))
    else:
        h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def _length_prefixed(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack("<I", len(encoded)) + encoded


def hash_full_blocks(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                     parents: Sequence[BlockHash] = (), lora: str | None = None) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, continuing after the already known `parents`."""
    hashes = list(parents)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[start:start + block_size], cache_salt, lora))
    return hashes
