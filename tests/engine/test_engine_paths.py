"""Every engine path gives the same greedy tokens: prefix cache on/off, cached second request, chunked vs whole
prefill, alone vs inside a batch of 32, after preemption, and with evicted prefixes copied back from the host tier.
Reference: the same prompt run alone, unchunked, without caching, which test_parity checks against HF transformers."""

import random
from dataclasses import replace

import pytest

from tests.hf_reference import hf_greedy
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams
from workers.kv.hashing import hash_full_blocks

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def prompts_with_shared_prefix(seed: int, n: int, prefix_len: int, tail: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(49152) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(49152) for _ in range(rng.randint(*tail))] for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def reference(model_path):
    """Each prompt alone, no prefix cache, whole-prompt prefill."""
    llm = LLM(str(model_path), num_kv_blocks=256, enable_prefix_caching=False, enable_chunked_prefill=False,
              max_num_batched_tokens=4096, progress=False)

    def run(prompt):
        return llm.generate(prompt, GREEDY)[0].outputs[0].token_ids

    return run


def test_reference_itself_matches_hf(model_path, reference):
    prompt = prompts_with_shared_prefix(0, 1, 40, (3, 9))[0]
    assert reference(prompt) == hf_greedy(model_path, prompt, NEW)


def test_second_request_hits_the_cache_and_gives_the_same_tokens(model_path, reference):
    llm = LLM(str(model_path), num_kv_blocks=256, progress=False)
    prompt = prompts_with_shared_prefix(1, 1, 50, (5, 5))[0]
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48  # three full 16-token blocks of the 55-token prompt
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == reference(prompt)


def test_cache_off_gives_no_hits_and_the_same_tokens(model_path, reference):
    llm = LLM(str(model_path), num_kv_blocks=256, enable_prefix_caching=False, progress=False)
    prompt = prompts_with_shared_prefix(2, 1, 40, (1, 1))[0]
    llm.generate(prompt, GREEDY)
    again = llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == reference(prompt)


def test_chunked_prefill_gives_the_same_tokens(model_path, reference):
    llm = LLM(str(model_path), num_kv_blocks=256, max_num_batched_tokens=13, progress=False)
    prompt = prompts_with_shared_prefix(3, 1, 100, (7, 7))[0]
    assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == reference(prompt)


def test_a_batch_of_32_mixed_prompts_gives_each_its_solo_tokens(model_path, reference):
    rng = random.Random(4)
    shared = prompts_with_shared_prefix(5, 4, 33, (1, 20))
    # The first sharer runs in the first step; the others arrive behind 28 random prompts and hit its blocks.
    prompts = shared[:1] + [[rng.randrange(49152) for _ in range(rng.randint(1, 150))] for _ in range(28)] + shared[1:]
    llm = LLM(str(model_path), num_kv_blocks=512, max_num_batched_tokens=256, progress=False)
    outs = llm.generate(prompts, GREEDY)
    assert len(outs) == 32
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference(prompt)
    assert [o.num_cached_tokens for o in outs[-3:]] == [32, 32, 32]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preempted_requests_recompute_to_the_same_tokens(model_path, reference, policy):
    # 12 blocks of 16 tokens cannot hold four 40-token prompts growing by 24 tokens each: preemption must happen.
    # By priority, the oldest request ranks last, so the one preempted is not the one FCFS would pick.
    llm = LLM(str(model_path), num_kv_blocks=12, scheduling_policy=policy, progress=False)
    prompts = prompts_with_shared_prefix(6, 4, 0, (40, 40))
    params = [GREEDY if policy == "fcfs" else replace(GREEDY, priority=-i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0, "the test setup must force a preemption"
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference(prompt)
    assert llm.engine.block_manager.num_free_blocks == 12


@pytest.mark.parametrize("budget", [1024, 13])
def test_prefixes_copied_back_from_the_host_tier_give_the_same_tokens(model_path, reference, budget):
    # Four documents of three blocks each, asked about one after another, on a 12-block cache: each pushes the
    # one before it out, into the host tier. Then a second question on every document, all at once: their
    # prefixes come back from the host tier (while the batch preempts and evicts), whole or in 13-token chunks.
    llm = LLM(str(model_path), num_kv_blocks=12, kv_offload_gb=0.01, max_num_batched_tokens=budget, progress=False)
    docs = [prompts_with_shared_prefix(10 + i, 2, 48, (3, 9)) for i in range(4)]
    first = [llm.generate(questions[0], GREEDY)[0] for questions in docs]
    bm = llm.engine.block_manager
    assert bm.num_offloaded_blocks > 0 and bm.num_reloaded_blocks == 0
    second = llm.generate([questions[1] for questions in docs], GREEDY)
    assert bm.num_reloaded_blocks >= 9  # three documents at least
    assert sum(out.num_cached_tokens for out in second) == 4 * 48
    for questions, outs in zip(docs, zip(first, second)):
        assert [out.outputs[0].token_ids for out in outs] == [reference(q) for q in questions]
    assert bm.num_free_blocks == 12


def test_a_group_going_away_hands_on_the_prefixes_its_host_tier_holds_too(model_path):
    """A replica Serve scales down sends its prefixes no other group holds to one that stays: those only its host
    tier still holds are among them."""
    llm = LLM(str(model_path), num_kv_blocks=12, kv_offload_gb=0.01, progress=False)
    docs = [prompts_with_shared_prefix(30 + i, 1, 48, (3, 3))[0] for i in range(4)]
    for doc in docs:
        llm.generate(doc, GREEDY)
    bm, first = llm.engine.block_manager, hash_full_blocks(docs[0][:48], 16, None)
    assert all(h not in bm.cached and h in bm.host for h in first)  # the first document left the KV cache
    handed = [prefix.token_ids for prefix in llm.engine.unique_prefixes(held_elsewhere=set())]
    assert all(any(tokens[:48] == doc[:48] for tokens in handed) for doc in docs)
