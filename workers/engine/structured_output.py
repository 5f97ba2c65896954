"""Structured outputs: a request's output held to a JSON schema, any JSON object, a regular expression, one of a
list of choices or an EBNF grammar, by masking before each choice the tokens the grammar cannot take next.

xgrammar does the grammar work, as in vLLM: a grammar is compiled once per engine against the tokenizer's
vocabulary (and cached), and each request gets a matcher that says, as a bitmask over the vocabulary, which tokens
may come next. Compiling takes milliseconds for a typical schema but grows fast with a grammar's size (seconds to a
minute for a regex of thousands of alternations), so servers compile off the engine thread: a large grammar delays
its own request, never the others. The matcher follows the request's output tokens rather than the sampler's calls,
so it stays right whichever group sampled a token: the prefill group's first token, or tokens kept through a
preemption.

The grammar decides where the output ends: once it is complete only EOS may follow, so a request that ignores EOS
or holds it back (min_tokens) cannot also have a structured output. JSON is held to one line, laid out as
json.dumps writes it: a model free to add whitespace between tokens can pad forever (vLLM's
disable_any_whitespace).
"""

import functools
import json
import logging
import re
from typing import TYPE_CHECKING

import torch

from workers.engine.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams, StructuredOutput

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

logger = logging.getLogger(__name__)

FIELD = "structured_output"
# The compiled grammars kept for the next request with the same spec, by size as vLLM keeps them: each holds token
# masks, megabytes for a large one.
_CACHE_LIMIT_BYTES = 256 * 1024 * 1024


def _xgrammar():
    """Imported when a request first asks for a structure: most requests never do."""
    import xgrammar

    return xgrammar


def _reason(error: Exception) -> str:
    """xgrammar's message without its '[time] file.cc:line: ' prefix."""
    return re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", str(error)).strip()


@functools.lru_cache(maxsize=256)
def grammar_of(spec: StructuredOutput):
    """The xgrammar Grammar the spec stands for; a schema, regex or grammar it cannot parse is refused, naming the
    field and why. Kept for the next request with the same spec: the engine checks a request's spec, then
    compiles it."""
    xgr = _xgrammar()
    if spec.json is not None:
        try:
            json.loads(spec.json)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(FIELD, f"json: the schema is not valid JSON ({e})") from None
    try:
        if spec.json is not None or spec.json_object:
            return _json_strings_held_to_json(
                xgr.Grammar.from_json_schema(spec.json or '{"type": "object"}', any_whitespace=False))
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice:
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except RuntimeError as e:
        raise InvalidRequestError(FIELD, f"{spec.kind}: {_reason(e)}") from None


# xgrammar (0.2.x, its issue #800) writes a string with minLength or maxLength as a run of this class: it lets raw
# control characters through, which no JSON parser takes, and leaves out escapes (\" \n \u00e9 ...).
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
# One character of a JSON string, raw or escaped, as the unbounded strings have it: a length counts either as one.
_JSON_STRING_CHAR = 'tandem_json_char'
_JSON_STRING_CHAR_RULE = (rf'{_JSON_STRING_CHAR} ::= [^\0-\x1f\"\\] | "\\" ([\"\\/bfnrt] | "u" [A-Fa-f0-9] '
                          r'[A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9])')


def _json_strings_held_to_json(grammar):
    """The schema's grammar with its bounded strings' characters made JSON's, so what it generates parses."""
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return _xgrammar().Grammar.from_ebnf(f"{text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)}\n"
                                         f"{_JSON_STRING_CHAR_RULE}\n", root_rule_name="root")


def check_structured_output(params: SamplingParams) -> None:
    """Refuses a spec that does not parse or that the other parameters would contradict."""
    spec = params.structured_output
    if spec is None:
        return
    if params.ignore_eos or params.min_tokens:
        raise InvalidRequestError(FIELD, "cannot be combined with ignore_eos or min_tokens: the structure decides "
                                         "where the output ends")
    if params.allowed_token_ids or params.bad_words:
        # Both masks together could leave no token at all.
        raise InvalidRequestError(FIELD, "cannot be combined with allowed_token_ids or bad_words: the structure "
                                         "decides which tokens may come next")
    grammar_of(spec)


class RequestGrammar:
    """One request's matcher and how many of its output tokens it has seen. With `after` (StructuredOutput.after)
    the matcher starts at the token following the first occurrence of those ids; until then the output is free.
    With an `opener` as well, the first token decides: the opener leaves the output free until `after`, any other
    is the structure's first (`deciding` until then)."""

    def __init__(self, compiled: "CompiledGrammar", after: tuple[int, ...] = (), opener: int | None = None):
        self.matcher = _xgrammar().GrammarMatcher(compiled)
        self.after = list(after)
        self.opener = opener
        self.started = not after
        self.deciding = bool(after) and opener is not None
        self.num_accepted = 0

    def update(self, output_token_ids: list[int]) -> "RequestGrammar":
        """Takes the tokens generated since the last update. A token the grammar refuses (one sampled where every
        token was masked) is logged and skipped: the mask still holds the rest of the output to the grammar."""
        if self.deciding and output_token_ids:
            self.deciding = False
            self.started = output_token_ids[0] != self.opener
        if not self.started:
            start = _end_of(self.after, output_token_ids, max(0, self.num_accepted - len(self.after) + 1))
            if start is None:
                self.num_accepted = len(output_token_ids)
                return self
            self.started, self.num_accepted = True, start
        for token_id in output_token_ids[self.num_accepted:]:
            if not self.matcher.accept_token(token_id):
                logger.warning("the structured output's grammar refused token %d; continuing without it", token_id)
        self.num_accepted = len(output_token_ids)
        return self

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """The row's tokens that may come next: the grammar's once it has started, and the opener too while the
        first token decides; every token (as allocated) while the output is free."""
        if self.started or self.deciding:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.deciding:
            word, bit = divmod(self.opener, 32)
            bitmask[row, word] |= (1 << bit) - (1 << 32 if bit == 31 else 0)  # int32 words: bit 31 is the sign


def _end_of(needle: list[int], tokens: list[int], start: int) -> int | None:
    """The index just past the first occurrence of `needle` in tokens[start:], or None."""
    for i in range(start, len(tokens) - len(needle) + 1):
        if tokens[i:i + len(needle)] == needle:
            return i + len(needle)
    return None


class GrammarCompiler:
    """An engine's compiler: the tokenizer's vocabulary analysed once, each distinct spec compiled once. Safe to
    call from several threads at a time."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_CACHE_LIMIT_BYTES)

    def compile(self, spec: StructuredOutput) -> "CompiledGrammar":
        """What RequestGrammar takes. xgrammar releases the GIL while it compiles."""
        return self._compiler.compile_grammar(grammar_of(spec))


def token_bitmask(grammars: list[RequestGrammar | None], output_token_ids: list[list[int]],
                  vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32: bit t of a row is set where token t may come next; every bit of a row without a
    grammar, or whose output is still free, is set."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
    for row, (grammar, output) in enumerate(zip(grammars, output_token_ids)):
        if grammar is not None:
            grammar.update(output).fill(bitmask, row)
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The logits with the tokens the bitmask leaves out at -inf, in place."""
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
    return logits
