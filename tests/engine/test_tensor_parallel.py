"""Tensor-parallel ranks together produce HF's greedy tokens.

Each case spawns `size` processes that share a gloo group (rendezvous through a TCPStore this process hosts on
a port the OS picks). Rank 0 runs the LLMEngine and drives the others with step plans; the followers run
workers/engine/follower.py until rank 0 shuts the group down.
"""

import datetime
import queue
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.engine.test_classification import SENTIMENT, hf_probs, random_prompt
from tests.engine.test_parity import SMOLLM2_QUESTIONS, assert_prompt_logprobs_match_hf, random_prompts
from tests.hf_reference import hf_embedding, hf_greedy
from tests.lora_adapters import ATTENTION, MLP, merged_model, write_adapter
from workers.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from workers.engine.follower import Follower
from workers.engine.llm import LLM
from workers.engine.llm_engine import LLMEngine
from workers.engine.parallel import TensorParallel, shard_heads
from workers.engine.sampling_params import SamplingParams, StructuredOutput

pytestmark = pytest.mark.slow

_TIMEOUT_S = 120


def _rank_main(rank: int, size: int, port: int, model: str, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams], speculative: int, lora_modules: dict[str, str],
               one_at_a_time: bool, cache: CacheConfig, embed: frozenset[int], results: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=_TIMEOUT_S))
        tp = TensorParallel(rank, size, dist.ProcessGroupGloo(store, rank, size))
        config = EngineConfig(model=ModelConfig(model, lora_modules=lora_modules, max_loras=1),
                              cache=cache,
                              scheduler=SchedulerConfig(max_num_batched_tokens=64),
                              speculative=SpeculativeConfig(num_speculative_tokens=speculative))
        if rank > 0:
            Follower(config, tp).run()
            results.put((rank, "stopped"))
            return
        engine = LLMEngine(config, tp=tp)
        each = params if isinstance(params, list) else [params] * len(prompts)
        items = list(zip(range(len(prompts)), prompts, each))
        waves = [[item] for item in items] if one_at_a_time else [items]
        ids, done = [], {}
        for wave in waves:
            ids += [engine.add_embedding_request(prompt) if i in embed else engine.add_request(prompt, p)
                    for i, prompt, p in wave]
            while engine.has_unfinished_requests():
                done.update((o.request_id, (o.embedding or o.outputs[0].token_ids, o.prompt_logprobs))
                            for o in engine.step() if o.finished)
        engine.shutdown()
        counts = {"accepted_guesses": engine.num_accepted_guesses,
                  "reloaded_blocks": engine.block_manager.num_reloaded_blocks}
        results.put((rank, ([done[i] for i in ids], counts)))
    except Exception as e:  # the parent reports it; a silent child would leave it waiting for the timeout
        results.put((rank, repr(e)))


def generate_tp(model: str, size: int, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                speculative: int = 0, lora_modules: dict[str, str] | None = None, one_at_a_time: bool = False,
                cache: CacheConfig = CacheConfig(num_kv_blocks=64),
                embed: frozenset[int] = frozenset()) -> tuple[list[tuple[list, list | None]], dict]:
    """Rank 0's greedy tokens and prompt logprobs, and its counts of the guesses it kept (with `speculative`
    tokens guessed per step) and of the blocks its host tier reloaded, once every follower has stopped cleanly.
    `params` is one for all prompts or one each; `one_at_a_time` runs each request alone, after the one before
    has finished. The engine keeps one adapter of those requests bring (max_loras=1). The prompts at the indices
    in `embed` are embedding requests instead: their embedding comes in place of the tokens."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, size, store.port, model, prompts, params, speculative,
                                                      lora_modules or {}, one_at_a_time, cache, embed, results))
             for r in range(size)]
    for p in procs:
        p.start()
    try:
        outs = dict(results.get(timeout=_TIMEOUT_S) for _ in procs)
    except queue.Empty:
        pytest.fail(f"tensor parallel ranks did not finish within {_TIMEOUT_S} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert [outs[r] for r in range(1, size)] == ["stopped"] * (size - 1), outs
    assert not isinstance(outs[0], str), outs[0]
    return outs[0]


def assert_matches_hf(path, size: int, prompts: list[list[int]], new_tokens: int) -> None:
    expected = [hf_greedy(path, p, new_tokens) for p in prompts]
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    assert [tokens for tokens, _ in generate_tp(str(path), size, prompts, greedy)[0]] == expected


@pytest.mark.parametrize(("arch", "size"), [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("llama", 4)])
def test_tiny_models_match_hf(arch, size, tiny_model_factory):
    """llama: untied head, 2 KV heads split over 2 ranks or replicated over 4; qwen2: qkv bias, tied embedding;
    qwen3: each rank norms its own query and key heads by the whole per-head weight."""
    # 70 tokens spans several KV blocks and, under a 64-token step budget, two chunks.
    assert_matches_hf(tiny_model_factory(arch), size, random_prompts(3, [5, 23, 70]), 24)


def test_prompt_logprobs_under_tensor_parallelism_match_hf(tiny_model_factory):
    """Every rank runs the vocab-parallel head on the prompt positions too, chunk by chunk, in step with rank 0."""
    path = tiny_model_factory("llama")
    prompts = random_prompts(4, [9, 70])
    outs, _ = generate_tp(str(path), 2, prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                                prompt_logprobs=2))
    for prompt, (tokens, prompt_logprobs) in zip(prompts, outs):
        assert tokens == hf_greedy(path, prompt, 4)
        assert_prompt_logprobs_match_hf(prompt_logprobs, prompt, path, 2)


def test_embeddings_under_tensor_parallelism_match_hf_beside_generation(tiny_model_factory):
    """Followers run no head on an embedding request's last row (its step plan says so), in step with rank 0,
    which reads the whole hidden state that every rank holds."""
    path = tiny_model_factory("qwen2")
    prompts = random_prompts(6, [5, 23, 70, 12])
    outs, _ = generate_tp(str(path), 2, prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                          embed=frozenset({1, 2}))
    assert [outs[0][0], outs[3][0]] == [hf_greedy(path, prompts[0], 8), hf_greedy(path, prompts[3], 8)]
    for i in (1, 2):
        torch.testing.assert_close(torch.tensor(outs[i][0]), hf_embedding(path, prompts[i]), atol=2e-5, rtol=0)


def test_a_classifiers_head_is_whole_on_every_rank_and_gives_hfs_probabilities(tiny_classifier_factory):
    path = tiny_classifier_factory("qwen2", SENTIMENT)
    prompts = [random_prompt(7, 5), random_prompt(8, 40)]
    outs, _ = generate_tp(str(path), 2, prompts, SamplingParams(max_tokens=1), embed=frozenset({0, 1}))
    for (logits, _), prompt in zip(outs, prompts):
        torch.testing.assert_close(torch.softmax(torch.tensor(logits), dim=-1), hf_probs(path, prompt), atol=1e-5,
                                   rtol=0)


def test_a_structured_output_under_tensor_parallelism_is_one_ranks(tiny_model_factory):
    """Rank 0 masks the logits the vocab-parallel head gathered from every rank: the tokens of one rank alone."""
    path = tiny_model_factory("llama")
    email = "[a-z]{2,6}@[a-z]{3,5}[.](com|org)"
    params = SamplingParams(max_tokens=32, temperature=0.0, structured_output=StructuredOutput(regex=email))
    prompts = random_prompts(5, [9, 40])
    alone = LLM(str(path), num_kv_blocks=64, progress=False).generate(prompts, params)
    assert [tokens for tokens, _ in generate_tp(str(path), 2, prompts, params)[0]] == \
        [out.outputs[0].token_ids for out in alone]
    assert all(re.fullmatch(email, out.outputs[0].text) for out in alone)


def test_lora_adapters_under_tensor_parallelism_match_hf_on_the_merged_weights(tiny_model_factory, tmp_path):
    """Column-parallel projections keep their rows of B, row-parallel ones their columns of A, whose partial
    product the all-reduce sums; base and adapter requests share the steps."""
    path = tiny_model_factory("llama")
    adapter = write_adapter(tmp_path / "adapter", path, ATTENTION + MLP, rank=4, alpha=8, seed=7, std=0.2)
    prompts = random_prompts(6, [9, 70])
    greedy = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, lora=lora) for lora in (None, "a")]
    requests = [(prompt, p) for prompt in prompts for p in greedy]
    outs, _ = generate_tp(str(path), 2, [prompt for prompt, _ in requests], [p for _, p in requests],
                          lora_modules={"a": str(adapter.folder)})
    merged = merged_model(adapter, path, tmp_path / "merged")
    expected = [hf_greedy(merged if p.lora else path, prompt, 16) for prompt, p in requests]
    assert [tokens for tokens, _ in outs] == expected
    assert expected[0] != expected[1] or expected[2] != expected[3]  # the adapter changes what the model says


def test_adapters_requests_bring_are_loaded_and_dropped_on_every_rank(tiny_model_factory, tmp_path):
    """Requests that bring their adapter's folder (a cluster loading adapters while it runs), one at a time, with
    max_loras=1: each load drops the other adapter, on rank 0 and, through the step plans, on the follower, and
    every request gets HF's tokens on its adapter's merged weights."""
    path = tiny_model_factory("llama")
    adapters = [write_adapter(tmp_path / name, path, ATTENTION + MLP, rank=4, alpha=8, seed=seed, std=0.2)
                for name, seed in (("a", 7), ("b", 8))]
    prompt = random_prompts(1, [9])[0]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, lora=f"{name}@1",
                             lora_path=str(adapter.folder))
              for name, adapter in zip("abab", adapters * 2)]
    outs, _ = generate_tp(str(path), 2, [prompt] * 4, params, one_at_a_time=True)
    expected = [hf_greedy(merged_model(adapter, path, tmp_path / f"merged-{i}"), prompt, 16)
                for i, adapter in enumerate(adapters)]
    assert expected[0] != expected[1]
    assert [tokens for tokens, _ in outs] == expected * 2


def test_prefixes_copied_back_from_the_host_tier_match_hf_on_every_rank(tiny_model_factory):
    """Rank 0 decides the copies between the KV cache and the host tier; each follower makes them on its shard of
    both before the step that reads them. Three documents of three blocks each on an 8-block cache, asked about
    twice: the second round finds them in the host tier."""
    path = tiny_model_factory("llama")
    docs = random_prompts(20, [48, 48, 48])
    prompts = [doc + tail for tail in ([1, 2, 3], [4, 5]) for doc in docs]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs, counts = generate_tp(str(path), 2, prompts, greedy, one_at_a_time=True,
                               cache=CacheConfig(num_kv_blocks=8, kv_offload_gb=0.01))
    assert [tokens for tokens, _ in outs] == [hf_greedy(path, p, 16) for p in prompts]
    assert counts["reloaded_blocks"] >= 3


def test_smollm2_three_ranks_match_hf_with_and_without_speculative_guesses(smollm2_path):
    """9 query heads and 3 KV heads: three ranks of 3 query heads and 1 KV head each. With guesses, the step plan
    carries each sequence's to the other ranks, so every rank computes the same rows of the same pass. Each reply
    finds something to guess at in some steps and nothing in others, so passes mix rows with and without guesses."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    quote = "Repeat exactly: the quick fox jumps over the lazy dog, the slow fox jumps over the tired dog."
    chats = [[{"role": "user", "content": q}] for q in [SMOLLM2_QUESTIONS[0], quote]]
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
               for c in chats]
    outs, counts = generate_tp(str(smollm2_path), 3, prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                                             ignore_eos=True), speculative=4)
    assert [tokens for tokens, _ in outs] == [hf_greedy(smollm2_path, p, 24) for p in prompts]
    assert counts["accepted_guesses"] > 0


@pytest.mark.parametrize(("heads", "kv_heads", "size", "expected"), [
    (4, 2, 2, [(2, 1, 0, 0), (2, 1, 2, 1)]),
    (4, 2, 4, [(1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 2, 1), (1, 1, 3, 1)]),
    (9, 3, 3, [(3, 1, 0, 0), (3, 1, 3, 1), (3, 1, 6, 2)]),
])
def test_heads_split_or_replicate(heads, kv_heads, size, expected):
    got = [shard_heads(heads, kv_heads, TensorParallel(r, size, _FakeGroup())) for r in range(size)]
    assert [(h.num_heads, h.num_kv_heads, h.first_head, h.first_kv_head) for h in got] == expected


@pytest.mark.parametrize(("heads", "kv_heads", "size"), [(9, 3, 2), (4, 2, 3), (6, 4, 3), (12, 4, 6)])
def test_heads_that_do_not_divide_are_rejected(heads, kv_heads, size):
    with pytest.raises(ValueError, match="tensor parallel size"):
        shard_heads(heads, kv_heads, TensorParallel(0, size, _FakeGroup()))


class _FakeGroup:
    """Stands in for a process group where no collective runs."""
