"""The routing policy as a specification: one continuous cost (tokens still to compute + work already there) picks
the prefill group, the decode group, and whether the decode group prefills the prompt itself. Every number below
follows from the formula at the top of router/policy.py with W, the default weights but a queued token weighing as
much as one to compute (compute_token 1, queued_token 1, running_seq 8, transfer_block 1, local_compute_token 2,
kv_usage 64), and 16-token blocks."""

import logging

import pytest

from router.policy import GroupLoad, RoutingWeights, rank_prefill, route, usable_cached_blocks

BS = 16
W = RoutingWeights(queued_token=1.0)


def idle(group_id: str, free_blocks: int = 1000, total_blocks: int = 1000, **load) -> GroupLoad:
    return GroupLoad(group_id, free_blocks, total_blocks, **load)


def best_prefill(prompt_len: int, cached: dict[str, int], loads: list[GroupLoad], weights: RoutingWeights = W) -> str:
    return rank_prefill(prompt_len, BS, cached, loads, weights)[0].group_id


# Prefill choice


def test_a_prefix_hit_wins_when_loads_are_equal():
    ranked = rank_prefill(256, BS, {"p1": 8}, [idle("p0"), idle("p1")], W)
    assert [(c.group_id, c.cached_blocks, c.compute, c.total) for c in ranked] == [
        ("p1", 8, 128.0, 128.0), ("p0", 0, 256.0, 256.0)]


def test_no_cached_prefix_anywhere_picks_the_least_loaded():
    loads = [idle("p0", queued_prefill_tokens=100), idle("p1", queued_prefill_tokens=50, running_seqs=2),
             idle("p2", running_seqs=10)]
    assert [(c.group_id, c.total) for c in rank_prefill(64, BS, {}, loads, W)] == [
        ("p1", 130.0), ("p2", 144.0), ("p0", 164.0)]


def test_the_cache_holder_loses_exactly_once_its_weighted_queue_exceeds_the_compute_its_cache_saves():
    # p0 holds 8 blocks of a 256-token prompt, saving 128 tokens: it wins while its queue is <= 128 tokens
    # (128 is a tie, which the smaller id wins), and loses from 129 on, never flipping back.
    choices = [best_prefill(256, {"p0": 8}, [idle("p0", queued_prefill_tokens=q), idle("p1")]) for q in range(400)]
    assert choices == ["p0"] * 129 + ["p1"] * 271
    routed = [route(256, BS, {"p0": 8}, [idle("p0", queued_prefill_tokens=q), idle("p1")], [idle("d0")],
                    W).prefill_group for q in (128, 129)]
    assert routed == ["p0", "p1"]


def test_running_decode_sequences_count_as_load_even_with_an_empty_prefill_queue():
    # p0's 2 cached blocks save 32 tokens; 4 running sequences (32) tie, 5 (40) lose to the idle p1.
    assert best_prefill(64, {"p0": 2}, [idle("p0", running_seqs=4), idle("p1")]) == "p0"
    assert best_prefill(64, {"p0": 2}, [idle("p0", running_seqs=5), idle("p1")]) == "p1"


def test_ties_are_broken_by_group_id_whatever_the_input_order():
    loads = [idle("b", queued_prefill_tokens=5), idle("a", queued_prefill_tokens=5), idle("c", queued_prefill_tokens=5)]
    assert [c.group_id for c in rank_prefill(64, BS, {}, loads, W)] == ["a", "b", "c"]
    assert [c.group_id for c in rank_prefill(64, BS, {}, loads[::-1], W)] == ["a", "b", "c"]
    assert route(64, BS, {}, [], [idle("d1"), idle("d0")], W).decode_group == "d0"


def test_on_equal_cost_a_new_prefix_goes_to_the_group_whose_cache_holds_the_fewest_blocks():
    # An idle pool ties on every new prefix; by id alone the first group would take each one.
    loads = [idle("a", held_blocks=64), idle("b", held_blocks=128), idle("c", held_blocks=0)]
    assert [c.group_id for c in rank_prefill(64, BS, {}, loads, W)] == ["c", "a", "b"]
    assert route(64, BS, {}, [], [idle("d0", held_blocks=9), idle("d1")], W).decode_group == "d1"
    # Cost still comes first: the emptier cache loses to a cheaper group.
    assert best_prefill(64, {}, [idle("a", held_blocks=64), idle("c", running_seqs=1)]) == "a"


def test_a_cached_prefix_counts_whole_blocks_and_never_the_last_token():
    assert usable_cached_blocks(32, BS, 2) == 1  # the 32nd token must be computed for the first token's logits
    assert usable_cached_blocks(33, BS, 2) == 2
    assert usable_cached_blocks(33, BS, 5) == 2  # the index may know a longer conversation than this prompt
    assert rank_prefill(32, BS, {"p0": 2}, [idle("p0")], W)[0].compute == 16.0


# Conditional disaggregation: local(d) = 2 x (1024 - 16 c) + load(d) vs remote = 1024 + (64 - c) for a 1024-token
# prompt (64 blocks) of which the decode group holds c blocks and the idle prefill group none.


def test_a_decode_group_holding_most_of_the_prompt_prefills_the_rest_itself():
    decision = route(1024, BS, {"d0": 60}, [idle("p0")], [idle("d0")], W)
    assert (decision.prefill_group, decision.decode_group, decision.cached_blocks) == (None, "d0", 60)
    assert (decision.local.total, decision.remote.total) == (128.0, 1028.0)


def test_a_decode_group_holding_little_of_the_prompt_gets_it_from_a_prefill_group():
    decision = route(1024, BS, {"d0": 4}, [idle("p0")], [idle("d0")], W)
    assert (decision.prefill_group, decision.decode_group, decision.cached_blocks) == ("p0", "d0", 0)
    assert (decision.local.total, decision.remote.total) == (1920.0, 1084.0)
    assert decision.remote.transfer == 60.0  # only the blocks the decode group lacks move


def test_local_prefill_starts_exactly_where_its_cost_drops_below_remote():
    # 2 x (1024 - 16 c) < 1024 + 64 - c  <=>  c > 960 / 31 = 30.97
    modes = [route(1024, BS, {"d0": c}, [idle("p0")], [idle("d0")], W).prefill_group for c in range(65)]
    assert modes == ["p0"] * 31 + [None] * 34


def test_a_busy_decode_group_leaves_the_prefill_to_the_prefill_pool():
    # holding 40 blocks: local 768 vs remote 1048; 35 running sequences add 280 and tip it.
    assert route(1024, BS, {"d0": 40}, [idle("p0")], [idle("d0", running_seqs=34)], W).prefill_group is None
    assert route(1024, BS, {"d0": 40}, [idle("p0")], [idle("d0", running_seqs=35)], W).prefill_group == "p0"


def test_without_prefill_groups_the_decode_group_prefills_locally():
    decision = route(100, BS, {"d1": 3}, [], [idle("d0"), idle("d1")], W)
    assert (decision.prefill_group, decision.decode_group, decision.cached_blocks, decision.remote) == (
        None, "d1", 3, None)


# Decode choice


def test_decode_groups_without_room_for_the_prompt_are_ranked_last():
    # 256 tokens need 16 blocks: the idle d0 has 15 free, so the busier d1 takes the request.
    decision = route(256, BS, {}, [idle("p0")], [idle("d0", 15, 100), idle("d1", 50, 100, running_seqs=3)], W)
    assert decision.decode_group == "d1"
    assert [c.group_id for c in decision.decode_costs] == ["d1", "d0"]


def test_when_no_decode_group_has_room_the_one_with_most_free_blocks_is_chosen():
    decision = route(256, BS, {}, [idle("p0")], [idle("d0", 10, 100), idle("d1", 12, 100, running_seqs=30),
                                                  idle("d2", 12, 100, running_seqs=40)], W)
    assert [c.group_id for c in decision.decode_costs] == ["d1", "d2", "d0"]


def test_decode_prefers_fewer_running_sequences():
    decode = [idle("d0", 48, 64, running_seqs=4), idle("d1", 48, 64, running_seqs=2)]
    decision = route(256, BS, {}, [idle("p0")], decode, W)
    assert [(c.group_id, c.decoding, c.kv_usage, c.prefill, c.total) for c in decision.decode_costs] == [
        ("d1", 16.0, 32.0, 272.0, 320.0), ("d0", 32.0, 32.0, 272.0, 336.0)]


def test_decode_prefers_more_free_blocks():
    # kv_usage = 64 x (used + 16 prompt blocks) / 64
    decision = route(256, BS, {}, [idle("p0")], [idle("d0", 32, 64), idle("d1", 48, 64)], W)
    assert [(c.group_id, c.kv_usage) for c in decision.decode_costs] == [("d1", 32.0), ("d0", 48.0)]


def test_decode_prefers_the_group_that_already_holds_the_conversation():
    decision = route(1024, BS, {"d1": 60}, [idle("p0")], [idle("d0"), idle("d1", running_seqs=2)], W)
    assert (decision.prefill_group, decision.decode_group, decision.cached_blocks) == (None, "d1", 60)


# Weights


def test_weights_change_the_outcome_as_documented():
    busy_holder = [idle("p0", running_seqs=5), idle("p1")]
    assert best_prefill(64, {"p0": 2}, busy_holder) == "p1"
    assert best_prefill(64, {"p0": 2}, busy_holder, RoutingWeights(running_seq=0)) == "p0"
    # local prefill at compute price: the decode group then prefills even without a cached prefix
    assert route(1024, BS, {}, [idle("p0")], [idle("d0")], W).prefill_group == "p0"
    assert route(1024, BS, {}, [idle("p0")], [idle("d0")], RoutingWeights(local_compute_token=1)).prefill_group is None
    # dearer transfers make the decode group prefill from fewer cached blocks (20 of 64: local 1408 vs remote
    # 1024 + 44 transfers, at 1 or at 16 per block)
    dear = RoutingWeights(transfer_block=16)
    assert route(1024, BS, {"d0": 20}, [idle("p0")], [idle("d0")], W).prefill_group == "p0"
    assert route(1024, BS, {"d0": 20}, [idle("p0")], [idle("d0")], dear).prefill_group is None
    # without the KV-usage term, free blocks no longer matter and the tie goes to the smaller id
    fuller_first = [idle("d0", 32, 64), idle("d1", 48, 64)]
    assert route(256, BS, {}, [idle("p0")], fuller_first, W).decode_group == "d1"
    assert route(256, BS, {}, [idle("p0")], fuller_first, RoutingWeights(kv_usage=0)).decode_group == "d0"


def test_weights_and_loads_reject_impossible_values():
    with pytest.raises(ValueError, match=r"^transfer_block must be >= 0 \(got -1\)$"):
        RoutingWeights(transfer_block=-1)
    with pytest.raises(ValueError, match=r"^free_blocks must be in \[0, total_blocks=10\] \(got 11\)$"):
        GroupLoad("d0", 11, 10)
    with pytest.raises(ValueError, match="no decode group"):
        route(64, BS, {}, [idle("p0")], [], W)


# The decision's record


def test_each_decision_logs_one_line_with_the_chosen_groups_cost_terms_and_cached_blocks(caplog):
    # 40 tokens = 3 blocks, at most 2 reusable. p0: 24 to compute + 8 queued; remote adds 3 blocks of transfer;
    # d0 locally: 2 x 40 + 1 running sequence; its KV usage with the prompt in is (2 + 3) / 8.
    with caplog.at_level(logging.INFO, logger="router.policy"):
        decision = route(40, BS, {"p0": 1}, [idle("p0", 10, 10, queued_prefill_tokens=8), idle("p1", 10, 10)],
                         [idle("d0", 6, 8, running_seqs=1)], W)
    assert [r.getMessage() for r in caplog.records] == [decision.describe()]
    assert decision.describe() == (
        "route prefill=p0 decode=d0 cached_blocks=1 "
        "local=d0(total=88 cached_blocks=0 compute=80 decoding=8) "
        "remote=p0(total=35 cached_blocks=1 compute=24 queued=8 transfer=3) "
        "prefill_candidates=[p0(total=32 cached_blocks=1 compute=24 queued=8), "
        "p1(total=40 cached_blocks=0 compute=40)] "
        "decode_candidates=[d0(total=83 cached_blocks=0 decoding=8 kv_usage=40 prefill=35)]")


def test_by_default_a_queued_token_weighs_a_quarter_of_one_to_compute():
    # The same 128 saved tokens keep p0 first until its queue passes 4 x 128 tokens.
    choices = [best_prefill(256, {"p0": 8}, [idle("p0", queued_prefill_tokens=q), idle("p1")], RoutingWeights())
               for q in (512, 516)]
    assert choices == ["p0", "p1"]
