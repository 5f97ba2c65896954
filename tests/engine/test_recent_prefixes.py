"""What a group that is going away hands on: the prefixes it holds that no other group does, as tokens."""

from workers.engine.recent_prefixes import RecentPrefixes
from workers.kv.hashing import hash_full_blocks

BS = 4


def chain(tokens: list[int], salt: str | None = None) -> tuple[list[int], list[bytes]]:
    return tokens, hash_full_blocks(tokens, BS, salt)


SYSTEM = list(range(100, 108))  # two blocks


def test_a_prefix_no_one_else_holds_is_handed_on_whole_blocks_only():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens, hashes = chain(SYSTEM + [1, 2, 3, 4, 5])  # three full blocks and a partial one
    recent.record(tokens, hashes, None)
    [prefix] = recent.unique(cached=set(hashes), held_elsewhere=set())
    assert prefix.token_ids == tokens[:12] and prefix.cache_salt is None


def test_prefixes_another_group_holds_whole_are_not_handed_on():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens, hashes = chain(SYSTEM)
    recent.record(tokens, hashes, None)
    assert recent.unique(cached=set(hashes), held_elsewhere=set(hashes)) == []


def test_a_shared_system_prompt_does_not_hide_a_users_own_blocks():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens, hashes = chain(SYSTEM + [1, 2, 3, 4])
    recent.record(tokens, hashes, None)
    [prefix] = recent.unique(cached=set(hashes), held_elsewhere=set(hashes[:2]))
    assert prefix.token_ids == tokens


def test_a_prefix_is_cut_where_the_cache_stopped_holding_it():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens, hashes = chain(SYSTEM + [1, 2, 3, 4])
    recent.record(tokens, hashes, None)
    [prefix] = recent.unique(cached=set(hashes[:2]), held_elsewhere=set())
    assert prefix.token_ids == SYSTEM
    assert recent.unique(cached=set(hashes[1:]), held_elsewhere=set()) == []  # the root block was evicted


def test_a_conversations_turns_cost_one_entry_and_the_longest_is_kept():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    first, first_hashes = chain(SYSTEM + [1, 2, 3, 4])
    second, second_hashes = chain(first + [5, 6, 7, 8])
    recent.record(first, first_hashes, None)
    recent.record(second, second_hashes, None)
    assert len(recent) == 1
    [prefix] = recent.unique(cached=set(second_hashes), held_elsewhere=set())
    assert prefix.token_ids == second


def test_two_users_of_one_system_prompt_are_both_handed_on_most_recent_first():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    alice, alice_hashes = chain(SYSTEM + [1, 2, 3, 4])
    bob, bob_hashes = chain(SYSTEM + [5, 6, 7, 8])
    recent.record(alice, alice_hashes, None)
    recent.record(bob, bob_hashes, None)
    prefixes = recent.unique(cached=set(alice_hashes + bob_hashes), held_elsewhere=set())
    assert [p.token_ids for p in prefixes] == [bob, alice]


def test_a_prefix_keeps_its_tenants_salt():
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens, hashes = chain(SYSTEM, salt="tenant-a")
    recent.record(tokens, hashes, "tenant-a")
    [prefix] = recent.unique(cached=set(hashes), held_elsewhere=set(hash_full_blocks(SYSTEM, BS)))
    assert prefix.cache_salt == "tenant-a"


def test_the_oldest_entries_go_once_the_tokens_kept_pass_capacity():
    recent = RecentPrefixes(BS, capacity_tokens=8)
    chains = [chain([i] * 4) for i in range(3)]
    for tokens, hashes in chains:
        recent.record(tokens, hashes, None)
    cached = {h for _, hashes in chains for h in hashes}
    assert [p.token_ids for p in recent.unique(cached, held_elsewhere=set())] == [[2] * 4, [1] * 4]


def test_a_prefix_computed_under_a_lora_adapter_is_handed_on_under_it():
    """Its blocks hold the adapter's KV: the survivor must compute the last block under the same adapter, or the
    hashes it caches would name other KV; one loaded while the cluster runs goes with its folder, which the
    survivor may not have loaded."""
    recent = RecentPrefixes(BS, capacity_tokens=1024)
    tokens = SYSTEM + [1, 2, 3, 4]
    base, adapted, loaded = (hash_full_blocks(tokens, BS, lora=lora) for lora in (None, "sql", "chat@3"))
    recent.record(tokens, base, None)
    recent.record(tokens, adapted, None, "sql")
    recent.record(tokens, loaded, None, "chat@3", "/adapters/chat")
    prefixes = recent.unique(cached=set(base) | set(adapted) | set(loaded), held_elsewhere=set())
    assert [(p.token_ids, p.lora, p.lora_path) for p in prefixes] == [
        (tokens, "chat@3", "/adapters/chat"), (tokens, "sql", None), (tokens, None, None)]
