"""The HF reference itself: the engine's parity tests are only as good as what they compare against."""

import pytest
from transformers import AutoTokenizer

from tests.conftest import TINY_ARCHS
from tests.hf_reference import hf_greedy, hf_logits

PROMPT = [1, 504, 3575, 282, 4649, 314]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_greedy_returns_exactly_max_new_tokens(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    new_tokens = hf_greedy(path, PROMPT, max_new_tokens=20)
    assert len(new_tokens) == 20
    assert len(set(new_tokens)) > 1, "random weights should not collapse to one repeated token"
    assert hf_logits(path, PROMPT).shape == (len(PROMPT), 49152)


def test_smollm2_answers_paris_and_runs_past_eos(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    # The answer takes 8 tokens including <|im_end|>; 16 shows generation does not stop at EOS.
    new_tokens = hf_greedy(smollm2_path, prompt, max_new_tokens=16)
    assert len(new_tokens) == 16
    assert tokenizer.eos_token_id in new_tokens
    assert "Paris" in tokenizer.decode(new_tokens, skip_special_tokens=True)
