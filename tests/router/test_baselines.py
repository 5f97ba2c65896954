"""The routing baselines as a specification: exact choices of round-robin, SGLang's cache_aware rule (abs 64,
rel 1.5, cache 0.3) and Ray's prefix-affinity rule (imbalanced 10, match rate 0.1), and the prefix tree they read.
Texts are strings here for readability; the routers use token ids, which the tree treats the same way."""

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from router.baselines import (
    PrefixTree,
    PrefixTreeRouter,
    RoundRobinRouter,
    SGLangCacheAwareRouter,
    choose_prefix_affinity,
    choose_round_robin,
    choose_sglang_cache_aware,
)


def tree_of(**texts: str) -> PrefixTree:
    tree = PrefixTree()
    for worker, text in texts.items():
        tree.insert(text, worker)
    return tree


# PrefixTree


def test_longest_match_follows_shared_and_diverging_prefixes():
    tree = tree_of(w0="abcd", w1="abxy", w2="ab")
    assert tree.longest_match("abcz") == {"w0": 3, "w1": 2, "w2": 2}
    assert tree.longest_match("abxyzz") == {"w0": 2, "w1": 4, "w2": 2}
    assert tree.longest_match("a") == {"w0": 1, "w1": 1, "w2": 1}
    assert tree.longest_match("zab") == {}
    assert tree.longest_match("") == {}


def test_a_workers_size_counts_its_distinct_characters_once():
    tree = tree_of(w0="abcd", w1="abxy")
    tree.insert("abef", "w0")
    tree.insert("abcd", "w0")
    assert (tree.size("w0"), tree.size("w1"), tree.size("never-sent")) == (6, 4, 0)


def test_token_ids_are_characters():
    tree = PrefixTree()
    tree.insert([1, 2, 3], "w0")
    assert tree.longest_match([1, 2, 4]) == {"w0": 2}
    assert tree.longest_match((1, 2, 3, 5)) == {"w0": 3}


def test_eviction_to_the_budget_keeps_the_most_recently_used_text():
    tree = tree_of(w0="aaaa")
    tree.insert("bbbb", "w0")
    tree.insert("aaaa", "w0")  # used again: now bbbb is the least recently used
    tree.evict("w0", 4)
    assert tree.size("w0") == 4
    assert tree.longest_match("aaaa") == {"w0": 4}
    assert tree.longest_match("bbbb") == {}


def test_eviction_trims_leaves_first_and_keeps_a_recently_used_shared_prefix():
    tree = tree_of(w0="abc1")
    tree.insert("abd2", "w0")  # a, b are shared; c, 1 are the oldest characters
    tree.evict("w0", 4)
    assert tree.longest_match("abc1") == {"w0": 2}
    assert tree.longest_match("abd2") == {"w0": 4}
    tree.evict("w0", 3)
    assert tree.longest_match("abd2") == {"w0": 3}


def test_eviction_is_per_worker():
    tree = tree_of(w0="abcd", w1="abcd")
    tree.evict("w0", 0)
    assert (tree.size("w0"), tree.size("w1")) == (0, 4)
    assert tree.longest_match("abcd") == {"w1": 4}
    tree.insert("ab", "w0")  # the tree still works for the emptied worker
    assert tree.longest_match("abcd") == {"w0": 2, "w1": 4}


# Round-robin


def test_round_robin_cycles_through_the_candidates_in_id_order():
    last, chosen = None, []
    for _ in range(7):
        last = choose_round_robin(["c", "a", "b"], last)
        chosen.append(last)
    assert chosen == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_continues_after_the_last_choice_when_replicas_change():
    assert choose_round_robin(["a", "c"], "b") == "c"  # b left
    assert choose_round_robin(["a", "b", "c", "d"], "c") == "d"  # d joined
    assert choose_round_robin(["a", "b"], "z") == "a"


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        choose_round_robin([], None)


# SGLang cache_aware: abs 64, rel 1.5, cache 0.3

WORKERS = ["w0", "w1", "w2"]


def sglang(text: str, tree: PrefixTree, **loads: int) -> str:
    return choose_sglang_cache_aware(WORKERS, text, tree, loads)


def test_sglang_balanced_takes_the_longest_match_above_the_cache_threshold():
    tree = tree_of(w0="xxxxx", w1="abcdefghij", w2="qqq")
    assert sglang("abcdXXXXXX", tree) == "w1"  # 4/10 > 0.3, although w2 holds less
    assert sglang("abcdXXXXXX", tree, w1=60, w2=0) == "w1"  # balanced: 60 apart is within abs 64


def test_sglang_balanced_below_the_cache_threshold_takes_the_smallest_tree():
    tree = tree_of(w0="xxxxx", w1="abcdefghij", w2="qqq")
    assert sglang("abcXXXXXXX", tree) == "w2"  # 3/10 is not above 0.3
    assert sglang("zzzz", tree) == "w2"
    assert sglang("", tree) == "w2"


def test_sglang_smallest_tree_counts_workers_never_sent_anything_as_empty():
    assert sglang("zzzz", tree_of(w1="ab", w2="c")) == "w0"


def test_sglang_imbalanced_takes_the_least_loaded_even_with_a_perfect_match():
    tree = tree_of(w0="abcdefghij")
    assert sglang("abcdefghij", tree, w0=100, w1=30, w2=35) == "w1"  # 70 > 64 and 100 > 1.5 * 30
    assert sglang("abcdefghij", tree, w0=65) == "w1"  # 65 > 64 and 65 > 0: w1 and w2 tie, the smaller id wins


def test_sglang_needs_both_thresholds_exceeded_to_balance_load():
    tree = tree_of(w0="abcdefghij")
    assert sglang("abcdefghij", tree, w0=200, w1=135, w2=135) == "w0"  # only abs: 65 > 64, 200 <= 202.5
    assert sglang("abcdefghij", tree, w0=10, w1=1, w2=1) == "w0"  # only rel: 10 > 1.5, but 9 <= 64
    assert sglang("abcdefghij", tree, w0=64) == "w0"  # 64 apart is not above 64


def test_sglang_thresholds_are_parameters():
    tree = tree_of(w0="abcdefghij")
    assert choose_sglang_cache_aware(WORKERS, "abcdefghij", tree, {"w0": 10}, balance_abs_threshold=5) == "w1"
    assert choose_sglang_cache_aware(WORKERS, "abcXXXXXXX", tree, {}, cache_threshold=0.2) == "w0"


def test_sglang_ties_go_to_the_smaller_id_whatever_the_input_order():
    tree = tree_of(w2="abcd", w1="abcd")
    assert choose_sglang_cache_aware(["w2", "w1", "w0"], "abcd", tree, {}) == "w1"


# Ray's prefix affinity: imbalanced 10, match rate 0.1


def affinity(text: str, tree: PrefixTree, **queue_lens: int) -> str:
    return choose_prefix_affinity(WORKERS, text, tree, queue_lens)


def test_affinity_balanced_takes_the_longest_match_at_or_above_the_match_rate():
    tree = tree_of(w1="abcdefghij", w2="xxxxxxxxxxxx")
    assert affinity("aXXXXXXXXX", tree) == "w1"  # 1/10 >= 0.1
    assert affinity("aXXXXXXXXX", tree, w1=10) == "w1"  # 10 apart is still balanced


def test_affinity_balanced_below_the_match_rate_takes_the_smallest_tree_with_the_shortest_queue():
    tree = tree_of(w1="abcdefghij")
    assert affinity("aXXXXXXXXXX", tree) == "w0"  # 1/11 < 0.1: w0 and w2 are empty, the smaller id wins
    assert affinity("aXXXXXXXXXX", tree, w0=3, w2=1) == "w2"


def test_affinity_longest_matches_that_tie_go_to_the_shortest_queue():
    tree = tree_of(w0="abcdefghij", w1="abcdefghij")
    assert affinity("abcdefghij", tree, w0=5, w1=2) == "w1"
    assert affinity("abcdefghij", tree, w0=2, w1=2) == "w0"


def test_affinity_imbalanced_takes_the_shortest_queue_even_with_a_perfect_match():
    tree = tree_of(w0="abcdefghij")
    assert affinity("abcdefghij", tree, w0=11, w2=3) == "w1"  # 11 apart > 10
    assert affinity("abcdefghij", tree, w0=10) == "w0"


# The Serve routers, driven directly (Serve's own router constructs them the same way; no Ray is started)


def make_router(cls, **kwargs):
    router = cls(deployment_id=DeploymentID(name="prefill"), handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


def replicas(*ids: str) -> list:
    return [SimpleNamespace(replica_id=ReplicaID(i, DeploymentID(name="prefill"))) for i in ids]


def request(request_id: str, prompt: object) -> SimpleNamespace:
    """Like the ingress's `prefill.remote(token_ids, params, request_id, cache_salt, routing=hint)`."""
    return SimpleNamespace(args=[prompt, None, request_id, None], kwargs={"routing": None},
                           metadata=SimpleNamespace(internal_request_id=request_id))


def tiers(router, candidates: list, pending=None) -> list[list[str]]:
    ranked = asyncio.run(router.choose_replicas(candidates, pending))
    return [[r.replica_id.unique_id for r in tier] for tier in ranked]


def test_round_robin_router_puts_the_next_replica_first_and_the_rest_after():
    router, candidates = make_router(RoundRobinRouter), replicas("r2", "r0", "r1")
    assert [tiers(router, candidates) for _ in range(4)] == [
        [["r0"], ["r1", "r2"]], [["r1"], ["r0", "r2"]], [["r2"], ["r0", "r1"]], [["r0"], ["r1", "r2"]]]


def test_sglang_router_learns_routed_prompts_and_counts_requests_in_flight():
    router, candidates = make_router(SGLangCacheAwareRouter, max_tree_chars=6), replicas("r0", "r1")
    first = request("q1", [1, 2, 3, 4, 5, 6, 7, 8])
    assert tiers(router, candidates, first) == [["r0"], ["r1"]]  # nothing learned: the smallest tree, r0
    router.on_request_routed(first, ReplicaID("r1", DeploymentID(name="prefill")), None)  # Serve fell through to r1
    assert router.in_flight == {"r1": 1}
    assert router.tree.longest_match([1, 2, 3, 4, 5, 6, 7, 8]) == {"r1": 6}  # bounded to 6 tokens
    assert tiers(router, candidates, request("q2", [1, 2, 3, 4, 5, 6, 9])) == [["r1"], ["r0"]]
    router.on_request_completed(ReplicaID("r0", DeploymentID(name="prefill")), "never-routed")
    router.on_request_completed(ReplicaID("r1", DeploymentID(name="prefill")), "q1")
    assert router.in_flight == {}


def test_sglang_router_balances_load_once_in_flight_requests_are_imbalanced():
    router, candidates = make_router(SGLangCacheAwareRouter, balance_abs_threshold=2), replicas("r0", "r1")
    r0 = ReplicaID("r0", DeploymentID(name="prefill"))
    for i in range(3):
        router.on_request_routed(request(f"q{i}", [7, 7, 7]), r0, None)
    assert tiers(router, candidates, request("q9", [7, 7, 7])) == [["r1"], ["r0"]]


def test_prefix_tree_router_follows_affinity_and_leaves_calls_without_a_prompt_to_serve():
    router, candidates = make_router(PrefixTreeRouter), replicas("r0", "r1")
    router.on_request_routed(request("q1", [5, 6, 7, 8]), ReplicaID("r1", DeploymentID(name="prefill")), None)
    assert tiers(router, candidates, request("q2", [5, 6, 0, 0])) == [["r1"], ["r0"]]
    handoff = SimpleNamespace(args=[object(), None, None], kwargs={}, metadata=SimpleNamespace(internal_request_id="h"))
    assert tiers(router, candidates, handoff) == [["r0", "r1"]]
    assert tiers(router, candidates, None) == [["r0", "r1"]]


def test_routers_reject_bad_thresholds():
    with pytest.raises(ValueError):
        make_router(SGLangCacheAwareRouter, cache_threshold=1.5)
    with pytest.raises(ValueError):
        make_router(PrefixTreeRouter, imbalanced_threshold=-1)
    with pytest.raises(ValueError):
        make_router(PrefixTreeRouter, max_tree_chars=0)
