"""Reasoning models think before they answer, between <think> and </think> (DeepSeek-R1 and its distills, QwQ,
Qwen3). With api.reasoning_parser set, as vLLM's --reasoning-parser, the chat API returns the thinking apart from
the answer (a message's `reasoning_content`, and `reasoning` as newer vLLM names it) and the Responses API as a
`reasoning` output item before the message. Tool calls and structured outputs concern the answer alone: a
structure holds the output from the end of the thinking on (StructuredOutput.after).

    deepseek_r1, qwen3    both name the <think>...</think> format, by vLLM's names for it

Where the thinking starts differs by chat template: R1's distills end the prompt with <think>; Qwen3 lets the
model open it, and with enable_thinking false closes an empty block in the prompt. So a reply is thinking from its
start when the prompt's last tag opens a block or the reply opens one first, up to </think>; a reply that never
reaches </think> (cut off by max_tokens) is all thinking, and a reply with no block at all is all answer. A
structure follows the same rule (`held`): from the end of the thinking where the prompt opened it, from the first
token where the prompt closed it, and where the model may open it, by its first token (as vLLM's structure waits
for the end of the thinking, except that a reply that answers at once is held too).
"""

from dataclasses import dataclass, field, replace

from workers.engine.sampling_params import StructuredOutput

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"
_PROMPT_TAIL_TOKENS = 16  # enough to hold the template's last tag and the turn markers after it


class ReasoningParser:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # The reasoning models' vocabularies hold </think> as one token, which is what they generate.
        self.end_token_ids = tuple(tokenizer.encode(END, add_special_tokens=False))
        start = tokenizer.encode(START, add_special_tokens=False)
        self.start_token_id = start[0] if len(start) == 1 else None  # what a model that opens the block generates

    def split(self, prompt_token_ids: list[int]) -> "ReasoningSplit":
        """A split for one reply to this prompt."""
        return ReasoningSplit(self.opened_by(prompt_token_ids))

    def opened_by(self, prompt_token_ids: list[int]) -> bool:
        """Whether the chat template left a thinking block open at the end of the prompt."""
        tail = self.tokenizer.decode(prompt_token_ids[-_PROMPT_TAIL_TOKENS:])
        return tail.rfind(START) > tail.rfind(END)

    def held(self, spec: StructuredOutput, prompt_token_ids: list[int]) -> StructuredOutput:
        """A structure (a format, or a forced tool call) as it holds a reply to this prompt: the answer, not the
        thinking. Where the prompt opened the thinking, from its end; where the prompt ends with a closed block
        (Qwen3's enable_thinking false), from the reply's first token; otherwise the model may open a block: the
        reply's first token is then <think> (the structure holds from the end of the block) or the structure's."""
        if self.opened_by(prompt_token_ids):
            return replace(spec, after=self.end_token_ids)
        tail = self.tokenizer.decode(prompt_token_ids[-_PROMPT_TAIL_TOKENS:])
        end = tail.rfind(END)
        if self.start_token_id is None or (end >= 0 and not tail[end + len(END):].strip()):
            return spec
        return replace(spec, after=self.end_token_ids, opener=self.start_token_id)

    def num_thinking_tokens(self, token_ids: list[int], parts: "Parts") -> int:
        """How many of a finished reply's tokens are its thinking: those up to the end of it; all of them where it
        thought and the end is not among its tokens (cut off, or written in other tokens)."""
        if parts.reasoning is None:
            return 0
        start = self.answer_start(token_ids)
        return len(token_ids) if start is None else start

    def answer_start(self, token_ids: list[int]) -> int | None:
        """The index of the answer's first token: just past the end of the thinking, where the reply generated
        </think> as the tokenizer writes it; None where it did not."""
        end = list(self.end_token_ids)
        return next((i + len(end) for i in range(len(token_ids) - len(end) + 1) if token_ids[i:i + len(end)] == end),
                    None)


@dataclass
class Parts:
    reasoning: str | None  # None: the reply does not think (or may still open a block)
    content: str
    answering: bool  # the thinking is over, or there is none: what comes next is answer


@dataclass
class ReasoningSplit:
    """One reply's thinking and answer as its text grows: each call says what is certain so far, so both parts
    only grow and a stream sends the difference (`news`). A tag still being generated ("</thi") is held back."""

    opened: bool  # the prompt left a thinking block open
    _thinking_sent: int = field(default=0, init=False)
    _answer_sent: int = field(default=0, init=False)

    def news(self, text: str, finished: bool) -> tuple[Parts, str, str]:
        """The parts so far, and the thinking and answer not returned by an earlier call."""
        parts = self.parts(text, finished)
        thinking = parts.reasoning or ""
        new = thinking[self._thinking_sent:], parts.content[self._answer_sent:]
        self._thinking_sent, self._answer_sent = len(thinking), len(parts.content)
        return parts, *new

    def parts(self, text: str, finished: bool) -> Parts:
        body, start = text, text.lstrip()
        if start.startswith(START):
            body = start[len(START):]
        elif not finished and START.startswith(start):  # may yet open a block (or repeat the prompt's)
            return Parts("" if self.opened else None, "", False)
        elif not self.opened:
            return Parts(None, text, True)
        end = body.find(END)
        if end >= 0:
            return Parts(body[:end], body[end + len(END):], True)
        return Parts(body if finished else body[:len(body) - partial_tag_length(body, END)], "", finished)


def partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest ending of `text` that begins `tag`: text a stream holds back, as it may be the
    start of the tag."""
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return keep
    return 0


def reasoning_parser(name: str | None, tokenizer) -> ReasoningParser | None:
    return ReasoningParser(tokenizer) if name is not None else None
