"""The input checks a request must pass, shared by the engine and the cluster's ingress so that a bad request is
refused at the front door with the same message the engine would give."""

from workers.engine.errors import InvalidRequestError, PromptTooLongError
from workers.engine.sampling_params import SamplingParams
from workers.engine.structured_output import check_structured_output

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; more is rarely useful and costs a top-k per token


def prompt_token_ids(tokenizer, prompt: str | list[int], vocab_size: int) -> tuple[str | None, list[int]]:
    """The prompt's text (None when given as ids) and token ids; an empty prompt or an id outside the
    vocabulary is refused."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        return prompt, tokenizer.encode(prompt)
    token_ids = list(prompt)
    if not token_ids:
        raise InvalidRequestError("prompt_token_ids", "must not be empty")
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequestError("prompt_token_ids", f"token id {t!r} is outside the vocabulary [0, {vocab_size})")
    return None, token_ids


def truncate_prompt(token_ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens, or as many as leave room for one generated token (-1)."""
    keep = params.truncate_prompt_tokens
    if keep is None:
        return token_ids
    return token_ids[-(max_model_len - 1 if keep == -1 else keep):]


def bad_words_token_ids(tokenizer, params: SamplingParams, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Each bad word's token ids as it is written at the start of a text and, where that differs, after a space
    (vLLM's rule): a word is banned at the start of the output and in the middle of it."""
    found: list[tuple[int, ...]] = []
    for word in params.bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids not in found:
                found.append(ids)
    if any(t >= vocab_size for ids in found for t in ids):
        raise InvalidRequestError("bad_words", f"a word's tokens fall outside the model's vocabulary [0, {vocab_size})")
    banned = {ids[0] for ids in found if len(ids) == 1}
    if params.allowed_token_ids and banned.issuperset(params.allowed_token_ids):
        raise InvalidRequestError("bad_words", "bans every token allowed_token_ids allows")
    return tuple(found)


def check_embedding_request(token_ids: list[int], max_model_len: int) -> None:
    """An embedding request generates nothing, so its prompt may fill the context."""
    if len(token_ids) > max_model_len:
        raise PromptTooLongError(len(token_ids), max_model_len)


def check_request(token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """The prompt leaves room for at least one generated token; the params fit the model; a structured output
    parses."""
    if len(token_ids) >= max_model_len:
        raise PromptTooLongError(len(token_ids), max_model_len - 1, "the model's context length minus one "
                                                                    "generated token")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > MAX_LOGPROBS:
            raise InvalidRequestError(name, f"at most {MAX_LOGPROBS}, got {value}")
    for name in ("stop_token_ids", "allowed_token_ids"):
        for t in getattr(params, name):
            if t >= vocab_size:
                raise InvalidRequestError(name, f"token id {t} is outside the vocabulary [0, {vocab_size})")
    for t, _ in params.logit_bias:
        if t >= vocab_size:
            raise InvalidRequestError("logit_bias", f"token id {t} is outside the vocabulary [0, {vocab_size})")
    spec = params.structured_output
    if spec is not None:
        for name, ids in (("after", spec.after), ("opener", () if spec.opener is None else (spec.opener,))):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError("structured_output", f"{name}: token id {bad} is outside the vocabulary "
                                                               f"[0, {vocab_size})")
    check_structured_output(params)
