"""The block manager, exactly: block ids, ref counts, eviction order, prefix hits and tenant isolation."""

import random

import pytest

from workers.engine.block_manager import BlockManager
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

BS = 4


def seq(tokens, salt=None, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(), BS, cache_salt=salt)


def run_prefill(bm: BlockManager, s: Sequence) -> list[int]:
    """Admit a sequence as the scheduler does and mark its whole prompt computed."""
    hits = bm.get_computed_blocks(s)
    assert bm.allocate_slots(s, s.num_tokens - len(hits) * BS, hits)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return hits


def test_fresh_allocation_takes_blocks_in_order():
    bm = BlockManager(8, BS)
    s = seq(range(10))
    run_prefill(bm, s)
    assert s.block_table == [0, 1, 2]
    assert [bm.blocks[b].ref_count for b in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5


def test_only_full_blocks_are_cached():
    bm = BlockManager(8, BS)
    s = seq(range(10))
    run_prefill(bm, s)
    assert set(bm.cached.values()) == {0, 1}
    assert bm.blocks[2].block_hash is None


def test_decode_allocates_a_block_only_when_the_last_one_fills():
    bm = BlockManager(8, BS)
    s = seq(range(7))
    run_prefill(bm, s)
    assert s.block_table == [0, 1]
    s.append_token(7)
    assert bm.allocate_slots(s, 1)
    assert s.block_table == [0, 1]
    s.num_computed_tokens += 1
    s.append_token(8)
    assert bm.allocate_slots(s, 1)
    assert s.block_table == [0, 1, 2]


def test_prefix_hit_shares_blocks_and_counts_references():
    bm = BlockManager(8, BS)
    a = seq(range(10), rid="a")
    run_prefill(bm, a)
    b = seq(list(range(8)) + [99, 98, 97], rid="b")
    hits = run_prefill(bm, b)
    assert hits == [0, 1]
    assert b.block_table == [0, 1, 3]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2


def test_hit_always_leaves_the_last_token_to_compute():
    bm = BlockManager(8, BS)
    run_prefill(bm, seq(range(8), rid="a"))
    again = seq(range(8), rid="b")
    assert bm.get_computed_blocks(again) == [0]


def test_freed_blocks_stay_cached_and_are_hit_off_the_free_queue():
    bm = BlockManager(8, BS)
    a = seq(range(10), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = seq(range(10), rid="b")
    assert run_prefill(bm, b) == [0, 1]
    assert bm.num_free_blocks == 5


def test_free_queue_order_uncached_first_then_tail_before_head():
    bm = BlockManager(6, BS)
    a = seq(range(10), rid="a")
    run_prefill(bm, a)  # blocks 0,1 cached, 2 partial
    bm.free(a)
    # never-used 3,4,5 stay ahead; partial block 2 jumps to the front; cached blocks go last, tail (1) before head (0)
    assert list(bm.free_queue) == [2, 3, 4, 5, 1, 0]


def test_eviction_takes_lru_block_and_drops_its_hash():
    bm = BlockManager(3, BS)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    assert list(bm.free_queue) == [2, 1, 0]
    b = seq(range(100, 108), rid="b")  # no hit; needs two blocks: 2 then 1 (evicting a's second block)
    run_prefill(bm, b)
    assert b.block_table == [2, 1]
    assert list(bm.cached.values()).count(0) == 1 and 1 in bm.cached.values()
    c = seq(range(9), rid="c")
    assert bm.get_computed_blocks(c) == [0]  # a's first block survived, its second was evicted


def test_allocation_failure_changes_nothing():
    bm = BlockManager(4, BS)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    b = seq(list(range(8)) + list(range(50, 62)), rid="b")  # hits 2 blocks, needs 3 more: 5 > 4
    hits = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    before = (list(bm.free_queue), [x.ref_count for x in bm.blocks], dict(bm.cached))
    assert not bm.allocate_slots(b, b.num_tokens - 8, hits)
    assert (list(bm.free_queue), [x.ref_count for x in bm.blocks], dict(bm.cached)) == before
    assert b.block_table == []


def test_cache_salt_isolates_tenants():
    bm = BlockManager(8, BS)
    run_prefill(bm, seq(range(10), salt="tenant-a", rid="a"))
    assert bm.get_computed_blocks(seq(range(10), salt="tenant-b", rid="b")) == []
    assert bm.get_computed_blocks(seq(range(10), rid="c")) == []
    assert bm.get_computed_blocks(seq(range(10), salt="tenant-a", rid="d")) == [0, 1]


def test_same_block_computed_twice_keeps_the_first_copy():
    bm = BlockManager(8, BS)
    a, b = seq(range(8), rid="a"), seq(range(8), rid="b")
    assert bm.allocate_slots(a, 8) and bm.allocate_slots(b, 8)
    a.num_computed_tokens = b.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert sorted(bm.cached.values()) == [0, 1]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, seq(range(10), rid="a"))
    assert bm.cached == {}
    assert bm.get_computed_blocks(seq(range(10), rid="b")) == []


def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(0, BS)


# -- the host tier (kv_offload_gb) -----------------------------------------------------------------------------


def admit(bm: BlockManager, s: Sequence) -> tuple[list[int], list]:
    """Admit a sequence as the scheduler does: device hits, then the blocks the host tier reloads after them."""
    hits = bm.get_computed_blocks(s)
    reloaded = bm.get_offloaded_blocks(s, len(hits))
    assert bm.allocate_slots(s, s.num_tokens - (len(hits) + len(reloaded)) * BS, hits, reloaded)
    return hits, reloaded


def test_an_evicted_cached_block_is_saved_to_the_host_tier_before_it_is_reused():
    bm = BlockManager(3, BS, num_host_blocks=4)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.take_copies() == []
    run_prefill(bm, seq(range(100, 112), rid="b"))  # takes the free block 2, then a's blocks, tail (1) first
    assert bm.take_copies() == [("out", 1, 0), ("out", 0, 1)]
    assert bm.num_offloaded_blocks == 2 and len(bm.host) == 2
    assert a.block_hashes[0] in bm and a.block_hashes[0] not in bm.cached


def test_a_prefix_in_the_host_tier_is_copied_back_into_fresh_blocks_and_cached_again():
    bm = BlockManager(3, BS, num_host_blocks=4)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    b = seq(range(100, 112), rid="b")
    run_prefill(bm, b)  # a's blocks go to host slots 0 and 1
    bm.free(b)
    bm.take_copies()
    again = seq(range(9), rid="again")  # a's two blocks and one token to compute
    hits, reloaded = admit(bm, again)
    assert hits == [] and reloaded == a.block_hashes[:2]
    # Each block taken is saved before a reload overwrites it; the last one takes the slot of b's least recently
    # used copy (its tail, saved first), which leaves the group.
    assert bm.take_copies() == [("out", 0, 2), ("in", 1, 0), ("out", 1, 3), ("in", 0, 1), ("out", 2, 2)]
    assert again.block_table == [0, 1, 2]
    assert bm.get_computed_blocks(seq(range(9), rid="next")) == [0, 1]
    assert bm.num_reloaded_blocks == 2
    assert [h in bm for h in b.block_hashes] == [True, True, False]


def test_without_room_to_allocate_a_reload_changes_nothing():
    bm = BlockManager(3, BS, num_host_blocks=4)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    run_prefill(bm, seq(range(100, 112), rid="b"))  # b keeps its three blocks
    bm.take_copies()
    again = seq(range(9), rid="again")
    reloaded = bm.get_offloaded_blocks(again, 0)
    assert not bm.allocate_slots(again, 1, [], reloaded)
    assert bm.take_copies() == [] and bm.num_reloaded_blocks == 0 and a.block_hashes[0] in bm.host


def test_the_host_tier_never_drops_a_copy_still_to_be_read():
    bm = BlockManager(2, BS, num_host_blocks=2)
    a, x, y = seq(range(5), rid="a"), seq(range(100, 105), rid="x"), seq(range(200, 208), rid="y")
    for s in (a, x, y):  # a's block, then x's, go to the host tier
        run_prefill(bm, s)
        bm.free(s)
    bm.take_copies()
    again = seq(range(5), rid="again")  # a's block back, and one for the token to compute
    hits, reloaded = admit(bm, again)
    assert reloaded == a.block_hashes
    # Saving y's tail needs a slot: not a's, the least recently used but still to be read; x's copy goes.
    assert bm.take_copies() == [("out", 1, 1), ("in", 0, 1), ("out", 0, 1)]
    assert x.block_hashes[0] not in bm and y.block_hashes[1] not in bm and y.block_hashes[0] in bm


def test_run_in_order_the_copies_leave_every_block_holding_what_its_hash_says():
    """A model of the memory: each device block and host slot holds the hash of what was computed into it. Under
    churn on a small cache and a smaller host tier, every block a sequence takes from the cache or the host tier
    holds its block's content once the copies have run."""
    rng = random.Random(0)
    bm = BlockManager(10, BS, num_host_blocks=6)
    device, host = [None] * 10, [None] * 6
    prefixes = [[rng.randrange(1000) for _ in range(12)] for _ in range(6)]
    for i in range(300):
        s = seq(rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 10))], rid=f"r{i}")
        hits, reloaded = admit(bm, s)
        for direction, src, dst in bm.take_copies():
            if direction == "out":
                host[dst] = device[src]
            else:
                device[dst] = host[src]
        num_cached = len(hits) + len(reloaded)
        assert [device[b] for b in s.block_table[:num_cached]] == s.block_hashes[:num_cached]
        for index in range(num_cached, len(s.block_table)):
            device[s.block_table[index]] = s.block_hashes[index] if index < len(s.block_hashes) else None
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
        bm.free(s)
        assert all(device[block_id] == h for h, block_id in bm.cached.items())
    assert bm.num_reloaded_blocks > 50 and bm.num_offloaded_blocks > 50


def test_reset_forgets_the_host_tier_too():
    bm = BlockManager(2, BS, num_host_blocks=2)
    a = seq(range(8), rid="a")
    run_prefill(bm, a)
    bm.free(a)
    run_prefill(bm, seq(range(100, 108), rid="b"))
    assert a.block_hashes[0] in bm.host
    bm.reset_prefix_cache()
    assert len(bm.host) == 0 and bm.get_offloaded_blocks(seq(range(9)), 0) == []
