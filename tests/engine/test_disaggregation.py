"""Prefill and decode roles of the same engine: a prefill engine computes the prompt and pins its blocks, a decode
engine receives only the blocks it lacks and continues; the tokens equal a unified engine's. The KV moves here by
a direct copy between the two engines' caches; moving it across processes is tests/workers/test_kv_transfer.py."""

import dataclasses
import random
import time

import pytest
import torch

from tests.hf_reference import hf_greedy
from tests.lora_adapters import ATTENTION, MLP, merged_model, write_adapter
from workers.engine.llm import LLM, engine_config
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model_factory):
    return tiny_model_factory("llama")


def engine(path, **kw):
    return LLM(str(path), num_kv_blocks=64, progress=False, **kw).engine


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def prefill(p, tokens, request_id, params=GREEDY):
    p.add_request(tokens, params, request_id=request_id, prefill_only=True)
    while True:
        for out in p.step():
            if out.request_id == request_id:
                assert out.finished and out.outputs[0].finish_reason == "prefilled"
                return out.handoff  # made in the step that sampled the first token


def move(p, d, plan):
    d.runner.copy_blocks(d.block_manager.take_copies())  # what transfer_kv runs before it writes: host-tier copies
    for (pk, pv), (dk, dv) in zip(p.runner.kv_caches, d.runner.kv_caches):
        dk[plan.dst_block_ids] = pk[plan.src_block_ids]
        dv[plan.dst_block_ids] = pv[plan.src_block_ids]


def disaggregated(p, d, tokens, request_id, params=GREEDY):
    handoff = prefill(p, tokens, request_id, params)
    plan = d.add_prefilled_request(handoff, params)
    move(p, d, plan)
    first = d.start_prefilled_request(handoff)
    p.release_pinned(request_id)
    return plan, run_until_finished(d, request_id, first)


def run_until_finished(d, request_id, out):
    while not out.finished:
        for o in d.step():
            if o.request_id == request_id:
                out = o
    return out.outputs[0].token_ids


def unified(path, tokens):
    return LLM(str(path), num_kv_blocks=64, progress=False).generate(tokens, GREEDY)[0].outputs[0].token_ids


def test_prefill_then_decode_gives_the_unified_tokens_and_frees_everything(path):
    p, d = engine(path), engine(path)
    for i, n in enumerate([5, 16, 40, 77]):
        tokens = prompt(i, n)
        plan, out = disaggregated(p, d, tokens, f"r{i}")
        assert out == unified(path, tokens)
        assert plan.num_cached_blocks == 0 and len(plan.src_block_ids) == -(-n // 16)
    assert not p.pinned and p.block_manager.num_free_blocks == 64
    assert not d.has_unfinished_requests() and d.block_manager.num_free_blocks == 64


def test_a_lora_request_continues_on_the_decode_engine_under_its_adapter(path, tmp_path):
    """The adapter travels in the request's params: the decode engine computes its tokens with it and caches its
    blocks under the adapter's hashes, which a base request of the same prompt does not find."""
    adapter = write_adapter(tmp_path / "adapter", path, ATTENTION + MLP, rank=4, alpha=8, seed=9, std=0.2)
    p, d = (engine(path, lora_modules={"a": str(adapter.folder)}) for _ in range(2))
    tokens, params = prompt(11, 40), dataclasses.replace(GREEDY, lora="a")
    plan, out = disaggregated(p, d, tokens, "lora", params)
    assert out == hf_greedy(merged_model(adapter, path, tmp_path / "merged"), tokens, 16) != unified(path, tokens)
    assert plan.num_cached_blocks == 0
    base_plan, base = disaggregated(p, d, tokens, "base")
    assert base == unified(path, tokens) and base_plan.num_cached_blocks == 0
    assert d.add_prefilled_request(prefill(p, tokens, "again", params), params).num_cached_blocks == 2


def test_decode_group_receives_only_the_blocks_its_prefix_cache_lacks(path):
    p, d = engine(path), engine(path)
    shared = prompt(10, 48)
    disaggregated(p, d, shared + prompt(11, 9), "first")
    second = shared + prompt(12, 20)
    plan, out = disaggregated(p, d, second, "second")
    assert plan.num_cached_blocks == 3  # the three shared 16-token blocks stay home
    assert len(plan.src_block_ids) == 2
    assert out == unified(path, second)


def test_decode_group_copies_back_from_its_host_tier_what_its_cache_evicted_instead_of_receiving_it(path):
    p, d = engine(path), LLM(str(path), num_kv_blocks=8, kv_offload_gb=0.01, progress=False).engine
    shared = prompt(10, 48)
    disaggregated(p, d, shared + prompt(11, 9), "first")
    disaggregated(p, d, prompt(13, 100), "filler")  # takes all 8 blocks: the shared ones go to the host tier
    assert d.block_manager.num_offloaded_blocks >= 3
    second = shared + prompt(12, 20)
    plan, out = disaggregated(p, d, second, "second")
    assert plan.num_cached_blocks == 3 and len(plan.src_block_ids) == 2
    assert d.block_manager.num_reloaded_blocks == 3
    assert out == unified(path, second)


def test_received_kv_is_bit_identical_to_what_the_decode_group_computes_itself(path):
    p, d, own = engine(path), engine(path), engine(path)
    tokens = prompt(20, 50)  # three full blocks and two tokens in the fourth
    handoff = prefill(p, tokens, "x")
    plan = d.add_prefilled_request(handoff, GREEDY)
    move(p, d, plan)
    prefill(own, tokens, "x")
    own_blocks = own.pinned["x"].seq.block_table
    for received, computed in zip(d.runner.kv_caches, own.runner.kv_caches):
        for r, c in zip(received, computed):  # K, then V
            r = r[plan.dst_block_ids].flatten(0, 1)[:50]
            c = c[own_blocks].flatten(0, 1)[:50]
            assert torch.equal(r, c)


def test_failed_transfer_falls_back_to_recompute_with_the_same_tokens(path):
    p, d = engine(path), engine(path)
    tokens = prompt(30, 35)
    handoff = prefill(p, tokens, "lost")
    d.add_prefilled_request(handoff, GREEDY)
    p.release_pinned("lost")  # as on abort: the prefill side lets go
    d.recompute_prefilled_request("lost")  # nothing arrived; the decode side computes the prompt itself
    out = None
    while d.has_unfinished_requests():
        for o in d.step():
            out = o
    assert out.finished and out.outputs[0].token_ids == unified(path, tokens)
    assert d.block_manager.num_free_blocks == 64 and p.block_manager.num_free_blocks == 64


def test_an_expired_lease_frees_the_pinned_blocks(path):
    p = LLM(str(path), num_kv_blocks=64, kv_lease_s=0.0, progress=False).engine
    prefill(p, prompt(40, 30), "late")
    time.sleep(0.01)
    p.step()
    assert not p.pinned and p.block_manager.num_free_blocks == 64


def test_an_unclaimed_handoff_frees_its_blocks_after_the_claim_window_and_a_claimed_one_keeps_them(path):
    """The handoff of a caller that left while its prefill call was on its way reaches nobody, and nobody claims
    it: its blocks go after kv_claim_s, while a claimed handoff's blocks wait the whole lease for the decode group."""
    config = engine_config(str(path), num_kv_blocks=64, kv_lease_s=60.0)
    p = LLMEngine(dataclasses.replace(config, cache=dataclasses.replace(config.cache, kv_claim_s=0.0)))
    prefill(p, prompt(60, 30), "claimed")
    p.claim_pinned("claimed")
    prefill(p, prompt(61, 30), "orphan")
    p.step()
    p.claim_pinned("orphan")  # too late: nothing is pinned for it any more
    assert list(p.pinned) == ["claimed"]
    assert p.block_manager.num_free_blocks == 64 - 2


def test_aborts_while_pinned_or_receiving_free_every_block(path):
    p, d = engine(path), engine(path)
    handoff = prefill(p, prompt(50, 33), "gone")
    d.add_prefilled_request(handoff, GREEDY)
    assert p.abort_request("gone") is None and not p.pinned
    assert d.abort_request("gone").outputs[0].finish_reason == "abort"
    assert not d.receiving
    assert p.block_manager.num_free_blocks == d.block_manager.num_free_blocks == 64
