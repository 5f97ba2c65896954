"""The scheduler without a model: budgets, chunking, admission, preemption and aborts, step by step."""

import random

from workers.engine.block_manager import BlockManager
from workers.engine.config import SchedulerConfig
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def make(num_blocks=16, **cfg):
    bm = BlockManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def seq(n, rid, start=0):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(), BS)


def advance(sched: Scheduler, out, token=7):
    """What the engine does after the model ran: count computed tokens, sample where the prompt is done."""
    for s, n in out.scheduled:
        s.num_computed_tokens += n
        sched.block_manager.cache_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(token)


def test_long_prompt_is_chunked_under_the_token_budget():
    sched, _ = make(max_num_batched_tokens=8)
    s = seq(20, "a")
    sched.add(s)
    chunks = []
    while s.num_computed_tokens < 20:
        out = sched.schedule()
        chunks.append(out.scheduled[0][1])
        advance(sched, out)
    assert chunks == [8, 8, 4]
    assert s.num_output_tokens == 1


def test_decodes_go_first_and_new_prompts_fill_the_rest_of_the_budget():
    sched, _ = make(max_num_batched_tokens=10)
    a = seq(6, "a")
    sched.add(a)
    advance(sched, sched.schedule())
    b = seq(20, "b", start=100)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 9)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched, _ = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add(seq(6, "a"))
    sched.add(seq(6, "b", start=50))
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 6)]
    big = seq(20, "big", start=200)
    sched2, _ = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched2.add(big)
    assert [(s.request_id, n) for s, n in sched2.schedule().scheduled] == [("big", 20)]


def test_max_num_seqs_caps_running_sequences():
    sched, _ = make(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(4, f"r{i}", start=10 * i))
    out = sched.schedule()
    assert [s.request_id for s, _ in out.scheduled] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_prefix_hit_skips_cached_tokens():
    sched, _ = make(max_num_batched_tokens=100)
    a = seq(10, "a")
    sched.add(a)
    advance(sched, sched.schedule())
    b = seq(10, "b")
    sched.add(b)
    out = sched.schedule()
    assert (b, 2) in out.scheduled
    assert b.num_cached_tokens == 8


def test_the_prefill_backlog_counts_only_tokens_still_to_compute():
    """Cached prefixes of waiting prompts are not backlog: the router would otherwise steer a busy prefix away from
    the replica that holds it."""
    sched, _ = make(max_num_batched_tokens=6)
    a = seq(10, "a")
    sched.add(a)
    assert sched.num_queued_prefill_tokens() == 10
    advance(sched, sched.schedule())  # a's first 6 tokens
    assert sched.num_queued_prefill_tokens() == 4  # the rest of a's prompt
    advance(sched, sched.schedule())
    assert sched.num_queued_prefill_tokens() == 0  # a decodes
    sched.add(seq(10, "b"))  # a's first two blocks are cached: 2 tokens left
    sched.add(seq(10, "c", start=100))  # nothing cached
    assert sched.num_queued_prefill_tokens() == 2 + 10


def test_a_prompt_waits_for_the_blocks_a_running_prefill_is_computing_and_others_go_ahead():
    sched, _ = make(max_num_batched_tokens=8)
    a = seq(13, "a")
    sched.add(a)
    advance(sched, sched.schedule())  # a's first 8 tokens: blocks 0 and 1 cached
    b = seq(13, "b")  # the same prompt
    c = seq(5, "c", start=100)  # nothing in common
    sched.add(b)
    sched.add(c)
    out = sched.schedule()  # a computes its last 5 tokens, block 2 among them
    assert out.scheduled == [(a, 5), (c, 3)]  # b would compute block 2 a second time: it waits, c goes ahead
    advance(sched, out)
    out = sched.schedule()
    assert (b, 1) in out.scheduled and b.num_cached_tokens == 12  # every block from the cache


def test_twins_arriving_together_compute_their_prompt_once():
    sched, _ = make(max_num_batched_tokens=100)
    a, b = seq(13, "a"), seq(13, "b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.scheduled == [(a, 13)]
    advance(sched, out)
    assert (b, 1) in sched.schedule().scheduled and b.num_cached_tokens == 12


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    sched, bm = make(num_blocks=4, max_num_batched_tokens=100)
    a, b = seq(4, "a"), seq(4, "b", start=50)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # each holds one full block, and has one sampled token
    assert bm.num_free_blocks == 2
    for _ in range(4):  # tokens 4..7: each takes a second block, which then fills up
        out = sched.schedule()
        assert out.preempted == []
        advance(sched, out)
    assert bm.num_free_blocks == 0
    out = sched.schedule()  # a needs a third block: the newest running sequence (b) gives its blocks back
    assert out.preempted == [b]
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1)]
    advance(sched, out)
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert a.status is SequenceStatus.RUNNING
    sched.finish(a, FinishReason.LENGTH)
    out = sched.schedule()
    assert out.scheduled[0][0] is b and out.scheduled[0][1] == b.num_tokens - b.num_computed_tokens


def test_priority_admits_by_priority_then_arrival_and_fcfs_by_arrival_alone():
    for policy, expected in (("priority", ["urgent", "r0", "r2", "r1"]), ("fcfs", ["r0", "r1", "r2", "urgent"])):
        sched, _ = make(max_num_seqs=1, max_num_batched_tokens=100, policy=policy)
        for rid, priority in (("r0", 0), ("r1", 5), ("r2", 0), ("urgent", -1)):
            sched.add(Sequence(rid, [1, 2, 3], SamplingParams(priority=priority), BS))
        admitted = []
        while sched.has_unfinished():
            [(s, _)] = sched.schedule().scheduled
            admitted.append(s.request_id)
            sched.finish(s, FinishReason.LENGTH)
        assert admitted == expected, policy


def test_out_of_blocks_preempts_the_lowest_priority_first_and_it_waits_behind_its_betters():
    sched, bm = make(num_blocks=4, max_num_batched_tokens=100, policy="priority")
    low, high = (Sequence(rid, list(range(start, start + 4)), SamplingParams(priority=p), BS)
                 for rid, start, p in (("low", 0, 1), ("high", 50, 0)))
    sched.add(low)
    sched.add(high)  # newer, so FCFS would preempt it
    advance(sched, sched.schedule())
    for _ in range(4):
        advance(sched, sched.schedule())
    assert bm.num_free_blocks == 0
    out = sched.schedule()
    assert out.preempted == [low] and [s.request_id for s, _ in out.scheduled] == ["high"]
    later = Sequence("later", list(range(90, 94)), SamplingParams(priority=0), BS)
    sched.add(later)
    assert [s.request_id for s in sched.waiting] == ["later", "low"]


def test_abort_storm_at_every_phase_leaks_no_blocks():
    rng = random.Random(0)
    sched, bm = make(num_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
    live = []
    for i in range(200):
        s = seq(rng.randint(1, 30), f"r{i}", start=rng.randint(0, 3) * 8)
        sched.add(s)
        live.append(s)
        advance(sched, sched.schedule())
        for s in list(live):
            if rng.random() < 0.25:
                sched.finish(s, FinishReason.ABORT)
                live.remove(s)
    for s in live:
        sched.finish(s, FinishReason.ABORT)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
