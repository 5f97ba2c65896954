"""The block manager, exactly: block ids, ref counts, eviction order, prefix hits and tenant isolation."""

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
