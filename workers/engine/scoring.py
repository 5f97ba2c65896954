"""Scoring pairs of texts (vLLM's score task), shared by LLM.score and the HTTP API's /v1/score and /v1/rerank: an
embedding model scores a pair by the cosine of its two embeddings, a cross-encoder (a classifier of one class,
relevance: a reranker) by reading the two texts together, as the tokenizer encodes a pair."""

from collections.abc import Sequence

import numpy as np


def score_pairs(firsts: Sequence[str], seconds: Sequence[str]) -> list[tuple[int, int]]:
    """The (first, second) index pairs to score: one first against every second, or the two lists one by one.
    Raises ValueError naming text_1 or text_2 (vLLM's names) otherwise."""
    for name, texts in (("text_1", firsts), ("text_2", seconds)):
        if not texts:
            raise ValueError(f"{name}: must not be empty")
    if len(firsts) not in (1, len(seconds)):
        raise ValueError(f"text_1: must be one text, or one per text_2 ({len(seconds)}), got {len(firsts)}")
    return [(0 if len(firsts) == 1 else i, i) for i in range(len(seconds))]


def pair_token_ids(tokenizer, first: str, second: str) -> list[int]:
    """Two texts as a cross-encoder reads them: the tokenizer's encoding of the pair (its special tokens between
    and around them, as the model was trained on), as vLLM encodes them."""
    return tokenizer(first, text_pair=second)["input_ids"]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Of two unit-length embeddings: their dot product."""
    return float(np.dot(a, b))
