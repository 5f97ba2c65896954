"""A request's state inside the engine: a few integers and lists, no tensors.

The whole life of a request is `num_computed_tokens` catching up to `num_tokens`. Prefill, chunked prefill,
a prefix-cache hit (which starts it above zero), KV arriving from a prefill pool and preemption by recompute
(which resets it to zero) are all just moves of that one counter.
"""

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.engine.sampling_params import SamplingParams
from workers.kv.hashing import BlockHash, hash_full_blocks

if TYPE_CHECKING:
    from workers.engine.structured_output import RequestGrammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client cancelled or the request failed
    PREFILLED = "prefilled"  # a prefill-only request has its first token; its KV waits for a decode group
    EMBEDDED = "embedded"  # an embedding request has its vector


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_size: int
    cache_salt: str | None = None
    # The tokens that end it when sampled: EOS (unless ignore_eos) and its stop token ids; min_tokens holds them back.
    end_token_ids: frozenset[int] = frozenset()
    # sampling_params.bad_words as token ids (validation.bad_words_token_ids): the last one of each is banned
    # where the output ends with the others.
    bad_words: tuple[tuple[int, ...], ...] = ()
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # How many prompt tokens the prefix cache supplied when the request was (last) admitted.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # One dict {token_id: logprob} per generated token when sampling_params.logprobs is set.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # With sampling_params.prompt_logprobs, the same for prompt tokens 1, 2, ...: the model runner adds them as
    # the prompt's chunks are computed.
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)
    arrival: int = field(default_factory=lambda: next(_arrival))
    # With sampling_params.structured_output, the matcher that masks its next token (structured_output.py).
    grammar: "RequestGrammar | None" = None
    # This step's guesses at the tokens after its last one (speculative.py): computed with it, kept where the model
    # agrees. Not part of token_ids, and gone after the step.
    draft_token_ids: list[int] = field(default_factory=list)
    # An embedding request: its prompt's last hidden state, normalized (a classifier's logits of it), is its output
    # (the model runner sets `embedding` in the step that computes the prompt's last token); it generates no token.
    embed: bool = False
    embedding: list[float] | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)
        self.block_hashes = hash_full_blocks(self.token_ids, self.block_size, self.cache_salt, lora=self.lora)

    @property
    def lora(self) -> str | None:
        return self.sampling_params.lora

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_prompt_logprob_positions(self) -> int:
        """The positions whose logits give prompt logprobs: each predicts the prompt token after it."""
        return self.num_prompt_tokens - 1 if self.sampling_params.prompt_logprobs is not None else 0

    @property
    def num_new_tokens(self) -> int:
        """Tokens whose KV is not computed yet: the prompt (or its rest) in prefill, one token in decode."""
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            self.block_hashes = hash_full_blocks(self.token_ids, self.block_size, self.cache_salt, self.block_hashes,
                                                 self.lora)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; prompt and generated tokens are re-prefilled later."""
        self.draft_token_ids.clear()
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
