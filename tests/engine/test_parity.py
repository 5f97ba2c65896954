"""Greedy output is token-identical to HF transformers' generate on the same weights, and logits agree.

Logit tolerance: in float32 on CPU, the log-probabilities of the top 20 tokens at every generated position
agree with HF's within 2e-3 (absolute); observed differences are around 1e-5.
"""

import random
from dataclasses import replace

import pytest
import torch

from tests.hf_reference import hf_greedy, hf_logits
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams
from workers.engine.validation import bad_words_token_ids

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one paragraph why the sky is blue.",
    "List three prime numbers and say why they are prime.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False)


def random_prompts(seed: int, lengths: list[int], vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def test_smollm2_chat_prompts_match_hf(smollm2, smollm2_path):
    prompts = [smollm2.apply_chat_template([{"role": "user", "content": q}]) for q in SMOLLM2_QUESTIONS]
    outs = smollm2.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(smollm2_path, prompt, NEW_TOKENS)


def test_smollm2_answers_the_capital_of_france(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_smollm2_raw_text_prompt_matches_hf(smollm2, smollm2_path):
    out = smollm2.generate("The three laws of thermodynamics are", GREEDY)[0]
    assert out.outputs[0].token_ids == hf_greedy(smollm2_path, out.prompt_token_ids, NEW_TOKENS)


def test_repetition_penalty_and_logit_bias_match_hfs_logits_processors(smollm2, smollm2_path):
    """HF's RepetitionPenaltyLogitsProcessor and SequenceBiasLogitsProcessor are the same arithmetic, applied in
    the same order; the penalty reaches back into the prompt, so a repeated prompt shows it from the first token."""
    prompts = [smollm2.apply_chat_template([{"role": "user", "content": q}]) for q in SMOLLM2_QUESTIONS[:2]]
    plain = smollm2.generate(prompts, GREEDY)
    bias = {plain[0].outputs[0].token_ids[3]: -7.5, 1000: 4.0}
    adjusted = smollm2.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                                        repetition_penalty=1.3, logit_bias=bias))
    for prompt, before, out in zip(prompts, plain, adjusted):
        assert out.outputs[0].token_ids == hf_greedy(smollm2_path, prompt, NEW_TOKENS, repetition_penalty=1.3,
                                                     sequence_bias={(t,): b for t, b in bias.items()})
        assert out.outputs[0].token_ids != before.outputs[0].token_ids
    assert smollm2.engine.runner.histories == {}  # each finished request let go of its token history


def test_min_tokens_matches_hfs_min_new_tokens(smollm2, smollm2_path):
    """HF's MinNewTokensLengthLogitsProcessor masks the EOS tokens until min_new_tokens, as min_tokens does."""
    prompt = smollm2.apply_chat_template([{"role": "user", "content": SMOLLM2_QUESTIONS[0]}])
    out = smollm2.generate(prompt, SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0))[0]
    assert out.outputs[0].token_ids == hf_greedy(smollm2_path, prompt, NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                 eos_token_id=sorted(smollm2.engine.eos_token_ids))


def test_allowed_token_ids_and_bad_words_match_hfs_logits_processors(smollm2, smollm2_path):
    """HF's PrefixConstrainedLogitsProcessor keeps the allowed tokens; NoBadWordsLogitsProcessor bans a word's last
    token where the text ends with the rest of it, as bad_words does (HF also looks into the prompt; these words
    do not reach into it)."""
    prompt = smollm2.apply_chat_template([{"role": "user", "content": SMOLLM2_QUESTIONS[2]}])
    plain = smollm2.generate(prompt, GREEDY)[0].outputs[0]
    allowed = sorted(set(plain.token_ids[::2]) | {11, 30, 314})
    held = smollm2.generate(prompt, replace(GREEDY, allowed_token_ids=allowed))[0].outputs[0]
    assert set(held.token_ids) <= set(allowed) and held.token_ids != plain.token_ids
    assert held.token_ids == hf_greedy(smollm2_path, prompt, NEW_TOKENS,
                                       prefix_allowed_tokens_fn=lambda batch, ids: allowed)

    assert "Rayleigh" in plain.text and " molecules" in plain.text
    words = replace(GREEDY, bad_words=["Rayleigh", "molecules"])  # " Rayleigh" is two tokens, " molecules" one
    banned = smollm2.generate(prompt, words)[0].outputs[0]
    assert "Ray" in banned.text and "Rayleigh" not in banned.text and "molecules" not in banned.text
    word_ids = bad_words_token_ids(smollm2.engine.tokenizer, words, smollm2.engine.vocab_size)
    assert banned.token_ids == hf_greedy(smollm2_path, prompt, NEW_TOKENS, bad_words_ids=[list(w) for w in word_ids])


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(smollm2, smollm2_path):
    prompt = smollm2.apply_chat_template([{"role": "user", "content": SMOLLM2_QUESTIONS[3]}])
    out = smollm2.generate(prompt, replace(GREEDY, truncate_prompt_tokens=12))[0]
    assert out.prompt_token_ids == prompt[-12:]
    assert out.outputs[0].token_ids == hf_greedy(smollm2_path, prompt[-12:], NEW_TOKENS)
    whole = smollm2.generate(prompt, replace(GREEDY, truncate_prompt_tokens=-1))[0]  # the context has room
    assert whole.prompt_token_ids == prompt


@pytest.mark.parametrize(("length", "chunk"), [(300, 1024), (70, 16)])
def test_prompt_logprobs_match_hf_whole_chunked_and_past_a_warm_cache(smollm2_path, length, chunk):
    """Every prompt token after the first gets its log-probability and the top 3 at the position before it, as
    HF's logits say; the same prompt cached by an earlier request is computed again rather than skipped. 300
    tokens in one step take two slices of the head's rows, 70 in 16-token chunks one slice each."""
    prompt = random_prompts(3, [length])[0]
    llm = LLM(str(smollm2_path), num_kv_blocks=256, max_num_batched_tokens=chunk, progress=False)
    llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))  # the prompt's blocks are now cached
    out = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3))[0]
    assert out.num_cached_tokens == 0
    assert_prompt_logprobs_match_hf(out.prompt_logprobs, prompt, smollm2_path, 3)


def assert_prompt_logprobs_match_hf(prompt_logprobs: list, prompt: list[int], path, top: int) -> None:
    """None for the first token, then each token's log-probability and the top ones at the position before it."""
    reference = torch.log_softmax(hf_logits(path, prompt).float(), dim=-1)
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt)
    for position, entry in enumerate(prompt_logprobs[1:]):
        expected = reference[position]
        assert set(entry) == set(expected.topk(top).indices.tolist()) | {prompt[position + 1]}
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(expected[token_id].item(), abs=2e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "granite"])
def test_tiny_random_models_match_hf(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    llm = LLM(str(path), num_kv_blocks=256, progress=False)
    # Lengths cross block boundaries, the llama3 rope scaling range and Mistral's 64-token sliding window.
    prompts = random_prompts(1, [5, 16, 47, 100])
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, NEW_TOKENS), arch


@pytest.mark.parametrize("arch", ["smollm2", "llama", "qwen2", "mistral", "qwen3", "granite"])
def test_logprobs_match_hf_logits(arch, smollm2_path, tiny_model_factory):
    path = smollm2_path if arch == "smollm2" else tiny_model_factory(arch)
    llm = LLM(str(path), num_kv_blocks=256, progress=False)
    prompt = random_prompts(2, [70])[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=20))[0]
    tokens = prompt + out.outputs[0].token_ids
    reference = torch.log_softmax(hf_logits(path, tokens).float(), dim=-1)
    for step, logprobs in enumerate(out.outputs[0].logprobs):
        row = reference[len(prompt) - 1 + step]
        ids = list(logprobs)
        ours = torch.tensor([logprobs[i] for i in ids])
        torch.testing.assert_close(ours, row[ids], atol=2e-3, rtol=0)
