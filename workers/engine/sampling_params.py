"""Per-request sampling parameters, validated once when the request enters the engine."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engine.errors import InvalidRequestError

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match, exactly one of: `json`, a JSON schema (as JSON text, or a dict); `json_object`,
    any JSON object; `regex`; `choice`, one of these strings; `grammar`, an EBNF grammar (xgrammar's GBNF) whose
    rule `root` is the output. vLLM's StructuredOutputsParams, by the same names.

    `after`: token ids the output reaches freely before the structure holds the rest, as a reasoning model thinks
    first and then answers (the API sets it to the end of the thinking, router/reasoning.py); empty: from the
    first token. `opener`, with `after`: the token that, as the output's first, opens what `after` closes (a
    model that starts its thinking itself); an output that starts with another token is held from there. The
    first token is then the structure's or the opener."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] = ()
    grammar: str | None = None
    after: tuple[int, ...] = ()
    opener: int | None = None

    def __post_init__(self):
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))
        if isinstance(self.choice, str):
            raise InvalidRequestError("structured_output", "choice must be a list of strings, got one string")
        object.__setattr__(self, "choice", tuple(self.choice))
        object.__setattr__(self, "after", tuple(self.after))
        given = [name for name in STRUCTURED_KINDS if getattr(self, name)]
        if len(given) != 1:
            raise InvalidRequestError("structured_output", f"give exactly one of json, json_object, regex, choice "
                                                           f"and grammar, got {given or 'none'}")
        for name in ("json", "regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError("structured_output", f"{name} must be a string")
        if not all(isinstance(c, str) and c for c in self.choice):
            raise InvalidRequestError("structured_output", "choice must be non-empty strings")

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_KINDS if getattr(self, name))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop; the names follow vLLM's so users find them familiar.

    temperature 0 means greedy. top_k 0 (or -1), top_p 1.0 and min_p 0 disable those filters (min_p drops the
    tokens less likely than min_p times the likeliest, after temperature and before top-k and top-p, as vLLM
    does). `min_tokens` holds back EOS and the stop token ids, and leaves stop strings unmatched, until that many
    tokens are generated. `seed` makes a request's random draws reproducible whatever else is in the batch; -1
    means none (vLLM's), another negative seed is read as a signed 64-bit integer. `logprobs` asks for the top-N
    log-probabilities of every generated token (plus the chosen one's), from the model's own distribution,
    before biases, penalties and temperature. `prompt_logprobs` asks the same of every prompt token after the
    first (vLLM's); a request that asks for them is computed whole, past the prefix cache, since a cached
    position has no logits. `structured_output` holds the output to a JSON schema, a regex, a list of choices or
    a grammar (structured_output.py). `truncate_prompt_tokens` keeps only the prompt's last k tokens (-1: as many
    as the context allows), for callers that would rather lose the start of a long prompt than be refused.
    `priority` orders requests where the engine's scheduling policy is "priority" (vLLM's: lower runs first,
    ties by arrival); it travels with the other params, so the prefill and the decode group both honour it.
    `lora` names the LoRA adapter that runs the request (one of the engine's lora_modules; None: the base model),
    and travels the same way, so every group that computes the request's KV computes it with the adapter.
    `lora_path` is the adapter's folder, for an adapter the cluster loaded while it runs: a group that has not
    loaded it yet reads it from there (adapter_cache.py).

    The logits are adjusted before greedy or sampled choice, in vLLM's order: `allowed_token_ids` bans every
    other token; `bad_words` bans the token that would complete any of these words (tokenized as at the start of
    the text and after a space, matched against the output); `logit_bias` ({token id: bias}) is added;
    `repetition_penalty` (HF's and vLLM's, 1.0 = off) divides positive logits and multiplies negative ones of
    every token in the prompt or output; `frequency_penalty` and `presence_penalty` (OpenAI's, 0 = off) subtract
    penalty x count and penalty x (count > 0) for each token already generated.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # also given as a dict {token id: bias}
    structured_output: StructuredOutput | None = None  # also given as a dict of its fields: {"json": schema}
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token
    bad_words: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    lora: str | None = None
    lora_path: str | None = None

    def __post_init__(self):
        # Accept lists and a lone string for convenience, store tuples so the params stay hashable/frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((token, value) for token, value in bias))
        if isinstance(self.structured_output, dict):
            object.__setattr__(self, "structured_output", StructuredOutput(**self.structured_output))
        if self.seed == -1:  # vLLM's (and many clients') "no seed"
            object.__setattr__(self, "seed", None)
        elif type(self.seed) is int and -2**63 <= self.seed < 0:  # a signed 64-bit seed, as OpenAI's API allows
            object.__setattr__(self, "seed", self.seed % 2**64)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 \
            or self.presence_penalty != 0.0 or self.min_tokens > 0 or bool(self.allowed_token_ids) \
            or bool(self.bad_words)

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be an integer from 0 to max_tokens ({self.max_tokens}), "
                                                    f"got {self.min_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            # A torch.Generator takes at most 64 bits; a larger seed would fail the engine step of the whole batch.
            raise InvalidRequestError("seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidRequestError(name, f"must be a non-negative integer, got {value!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            for t in getattr(self, name):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise InvalidRequestError(name, f"must be non-negative token ids, got {t!r}")
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip():
                raise InvalidRequestError("bad_words", f"must be words, got {word!r}")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int)
                                     or not (truncate == -1 or truncate >= 1)):
            raise InvalidRequestError("truncate_prompt_tokens", f"must be -1 (as many as the context allows) or a "
                                                                f"positive integer, got {truncate!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequestError("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty!r}")
        for token, value in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidRequestError("logit_bias", f"keys must be non-negative token ids, got {token!r}")
            if not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
                raise InvalidRequestError("logit_bias", f"biases must be in [-100, 100], got {value!r} for "
                                                        f"token {token}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidRequestError("priority", f"must be an integer, got {self.priority!r}")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise InvalidRequestError("lora", f"must be an adapter's name or None, got {self.lora!r}")
        if self.lora_path is not None and (self.lora is None or not isinstance(self.lora_path, str)):
            raise InvalidRequestError("lora_path", f"must be the folder of the adapter `lora` names, got "
                                                   f"{self.lora_path!r} for lora={self.lora!r}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise InvalidRequestError("structured_output", f"must be a StructuredOutput or a dict of its fields, got "
                                                           f"{type(self.structured_output).__name__}")


# The generation_config.json keys that set defaults, and the field each sets: those vLLM's --generation-config auto
# reads (do_sample is not one: a temperature decides).
_GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_config_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling a model's creator recommends in its generation_config.json (Qwen2.5-Instruct: temperature 0.7,
    top_p 0.8, top_k 20, repetition_penalty 1.05), as SamplingParams fields, for requests that leave them unset:
    HF's generate and vLLM apply them so, and a model sampled at temperature 1 where its card says 0.7 rambles.
    {} where the folder has none. A value the engine would refuse raises ValueError naming the file, at start,
    instead of refusing every request."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    defaults = {field: config[key] for key, field in _GENERATION_CONFIG_KEYS.items() if config.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except InvalidRequestError as e:
        key = next((k for k, field in _GENERATION_CONFIG_KEYS.items() if field == e.field), e.field)
        raise ValueError(f"{path}: {key}: {e.message} (generation_config none leaves the model's defaults out)") \
            from None
    return defaults


def recommended_fields(recommended: dict[str, Any]) -> dict[str, Any]:
    """The fields of a request that sets none, from `recommended` (generation_config_defaults): its max_new_tokens
    lowers the engine's default max_tokens, never raises it (vLLM takes the least of such limits too)."""
    fields = dict(recommended)
    if "max_tokens" in fields:
        fields["max_tokens"] = min(fields["max_tokens"], SamplingParams.max_tokens)
    return fields
