"""Block hashes are the cluster's shared vocabulary: they must chain, respect the tenant salt, and never change
silently (routers and workers of different builds compare them)."""

import hashlib
import struct

from workers.kv.hashing import hash_block_tokens, hash_full_blocks


def test_only_full_blocks_are_hashed():
    assert len(hash_full_blocks(list(range(47)), 16)) == 2
    assert len(hash_full_blocks(list(range(48)), 16)) == 3


def test_hash_depends_on_the_whole_prefix_not_just_the_block():
    a = hash_full_blocks([1] * 16 + [2] * 16, 16)
    b = hash_full_blocks([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1]


def test_continuing_from_known_parents_equals_hashing_from_scratch():
    tokens = list(range(100))
    assert hash_full_blocks(tokens, 16, parents=hash_full_blocks(tokens[:40], 16)) == hash_full_blocks(tokens, 16)


def test_cache_salt_changes_every_block_and_none_equals_empty():
    tokens = list(range(32))
    plain, salted = hash_full_blocks(tokens, 16), hash_full_blocks(tokens, 16, "tenant-a")
    assert all(p != s for p, s in zip(plain, salted))
    assert hash_full_blocks(tokens, 16, "") == plain
    assert hash_full_blocks(tokens, 16, "tenant-b") != salted


def test_a_lora_adapter_changes_every_block_apart_from_any_salt():
    tokens = list(range(32))
    plain, adapted = hash_full_blocks(tokens, 16), hash_full_blocks(tokens, 16, lora="sql")
    assert all(p != a for p, a in zip(plain, adapted))
    assert hash_full_blocks(tokens, 16, "sql") != adapted  # a tenant salted "sql" is not the adapter "sql"
    both = hash_full_blocks(tokens, 16, "tenant-a", lora="sql")
    assert both not in (adapted, hash_full_blocks(tokens, 16, "tenant-a"))


def test_the_hash_is_sha256_of_parent_or_root_and_little_endian_uint32_tokens():
    first = hash_block_tokens(None, list(range(16)))
    assert first.hex() == "82c998455cefa32034683043b05ff6a7fa3097d7e2623ebc2c6ae6c14eeaad11"
    assert first == hashlib.sha256(b"tandem-kv-v1" + struct.pack("<16I", *range(16))).digest()
    second = hash_block_tokens(first, list(range(16, 32)))
    assert second == hashlib.sha256(first + struct.pack("<16I", *range(16, 32))).digest()
    salted = hash_block_tokens(None, [7] * 16, "ab")
    assert salted == hashlib.sha256(b"tandem-kv-v1" + struct.pack("<I", 2) + b"ab"
                                    + struct.pack("<16I", *[7] * 16)).digest()
    adapted = hash_block_tokens(None, [7] * 16, "ab", lora="sql")
    assert adapted == hashlib.sha256(b"tandem-kv-v1" + struct.pack("<I", 2) + b"ab" + b"lora" + struct.pack("<I", 3)
                                     + b"sql" + struct.pack("<16I", *[7] * 16)).digest()
