"""Speculative decoding by n-gram lookup (vLLM's "ngram" method, also called prompt lookup decoding).

Text that quotes its context (a summary citing its source, code edited in place, a form filled from a document)
repeats runs of tokens it has seen. When the last few tokens of a sequence occurred earlier in it, the tokens that
followed them there are a guess at what comes next. The engine computes the sequence's next position and the
guessed ones in one forward pass, like a short prefill chunk. A greedy request keeps every guess that equals the
model's own choice and replaces the first that differs by that choice: exactly the tokens of one token per step,
in fewer steps (a decode step reads all the weights for one token, and a few more tokens in the same pass cost
little more). A sampled request draws each position's token as one token per step would (the same distribution,
the next row of its noise) and keeps the guesses those draws equal (Sampler.verify): a guess is then kept with the
probability its distribution gives it, as rejection sampling keeps a certain guess, and a seeded request's tokens
are exactly those one token per step draws.

Requests with logit adjustments or a structured output take no guesses; they decode one token per step beside
the others. Logprobs come from the row of each kept token, as they would from its own step.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from workers.engine.config import SpeculativeConfig
from workers.engine.sequence import Sequence


def propose(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the latest earlier occurrence of the sequence's last n tokens, for
    the longest n from max_n down to min_n that occurred; none if no such n-gram did."""
    tokens = np.asarray(token_ids)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        # Each window of n tokens that starts early enough to have a token after it, against the last n.
        windows = sliding_window_view(tokens[:-1], n)
        found = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if found.size:
            start = found[-1] + n
            return tokens[start:start + num_tokens].tolist()
    return []


def takes_guesses(seq: Sequence) -> bool:
    """Whether the sequence's next tokens can be checked against guesses: decoding, and nothing that changes a
    token's logits by the tokens before it (penalties and bans, a grammar)."""
    params = seq.sampling_params
    return not params.adjusts_logits and seq.grammar is None and seq.num_new_tokens == 1 \
        and seq.num_output_tokens > 0


def guess(seq: Sequence, config: SpeculativeConfig, max_seq_len: int) -> list[int]:
    """The sequence's guesses for this step: never past its max_tokens, nor a position the cache cannot hold."""
    room = min(config.num_speculative_tokens, seq.sampling_params.max_tokens - seq.num_output_tokens - 1,
               max_seq_len - seq.num_tokens)
    if room <= 0:
        return []
    return propose(seq.token_ids, room, config.prompt_lookup_min, config.prompt_lookup_max)


def accept(guesses: list[int], choices: list[int]) -> list[int]:
    """The tokens a step yields: `choices` are the model's greedy picks after the sequence's last token and after
    each guess; the guesses that equal the pick before them are kept, then the pick where they first differ (or
    the one after the last guess)."""
    kept = 0
    while kept < len(guesses) and guesses[kept] == choices[kept]:
        kept += 1
    return choices[:kept + 1]
