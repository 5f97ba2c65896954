"""Hugging Face transformers as the ground truth the engine is compared against.

Everything runs in float32, one prompt at a time and without padding, so any difference from the engine comes
from the engine rather than from batching or precision in the reference.
"""

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def hf_model(path: str | Path) -> PreTrainedModel:
    """Loads the model once per folder: a test module compares many prompts against the same weights."""
    return _load(str(Path(path).resolve()))


@functools.cache
def _load(path: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # `generate` fills an eos_token_id passed as None from the model's own generation config, so the only way
    # to get exactly max_new_tokens back is to clear it here; engine tests then run with EOS ignored too.
    model.generation_config.eos_token_id = None
    return model


@torch.no_grad()
def hf_greedy(path: str | Path, prompt_token_ids: list[int], max_new_tokens: int, **logits_processing) -> list[int]:
    """Returns only the new token ids, always exactly `max_new_tokens` of them. `logits_processing` goes to
    `generate` (repetition_penalty, sequence_bias)."""
    model = hf_model(path)
    input_ids = torch.tensor([prompt_token_ids], dtype=torch.long)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        **logits_processing,
    )
    return output[0, len(prompt_token_ids) :].tolist()


@torch.no_grad()
def hf_logits(path: str | Path, token_ids: list[int]) -> torch.Tensor:
    """Returns the [len(token_ids), vocab] logits of one plain causal forward pass."""
    model = hf_model(path)
    return model(torch.tensor([token_ids], dtype=torch.long)).logits[0]


@torch.no_grad()
def hf_embedding(path: str | Path, token_ids: list[int]) -> torch.Tensor:
    """The last token's hidden state after the final norm, unit length: what a decoder-only embedding model (such
    as e5-mistral) gives for the prompt."""
    model = hf_model(path)
    hidden = model(torch.tensor([token_ids], dtype=torch.long), output_hidden_states=True).hidden_states[-1][0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)
