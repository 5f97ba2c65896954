"""Finding tool calls in a model's own text, for tool_choice "auto": the format is the model's, so the parser is
chosen per deployment (api.tool_call_parser), as vLLM's --tool-call-parser is.

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of them, after optional
                  text: Qwen2.5, Qwen3 and the Hermes models
    llama3_json   the whole reply is {"name": ..., "parameters": {...}}, or several separated by ";", optionally
                  after <|python_tag|>: Llama 3.1 and 3.2
    mistral       the whole reply is [TOOL_CALLS] and a JSON array of {"name": ..., "arguments": {...}}: Mistral 7B
                  Instruct v0.3, Mistral Nemo and Small (the tokenizers before v11); the tag is a special token,
                  which the text leaves out unless skip_special_tokens is false, so it is read either way

Each has `parse(text) -> (content, calls)` for a finished reply and, for one still being generated,
`content_so_far(text)`, how much of it is surely text, which streams as content, and `calls_so_far(text)`, the
calls begun in it, whose arguments stream as they are generated.
"""

from typing import Any

from router.reasoning import partial_tag_length
from router.tool_call_json import CallSoFar, call_so_far, calls_in_sequence, space, whole_call


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    argument_keys = ("arguments",)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """The reply's content (the text before the first call; None if only whitespace) and its tool calls, or
        (text, None) where it makes none or one of them is not a whole call (not JSON, no name, not closed)."""
        first = text.find(self.start)
        if first < 0:
            return text, None
        calls, at = [], first
        while at >= 0:
            call, end = whole_call(text, space(text, at + len(self.start)), self.argument_keys)
            close = space(text, end)
            if call is None or not text.startswith(self.end, close):
                return text, None
            calls.append(call)
            at = text.find(self.start, close + len(self.end))
        content = text[:first]
        return (content if content.strip() else None), calls

    def content_so_far(self, text: str) -> int:
        """How much of a reply still being generated is surely content: up to its first call, less any ending
        that may be the start of one."""
        first = text.find(self.start)
        if first >= 0:
            return first
        return len(text) - partial_tag_length(text, self.start)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        """A call per <tool_call> opened so far."""
        calls, at = [], text.find(self.start)
        while at >= 0:
            body = space(text, at + len(self.start))
            if text[body:body + 1] != "{":
                break
            call, end = call_so_far(text, body, self.argument_keys)
            calls.append(call)
            if end is None:
                break
            at = text.find(self.start, end)
        return calls


class Llama3JsonToolParser:
    tag = "<|python_tag|>"
    argument_keys = ("parameters", "arguments")

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """No content and the calls, where the whole reply is calls; else (text, None)."""
        body = self._body(text)
        if not body.startswith("{"):
            return text, None
        calls, at = [], 0
        while at < len(body):
            call, at = whole_call(body, at, self.argument_keys)
            if call is None:
                return text, None
            calls.append(call)
            while at < len(body) and body[at] in "; \n\t":
                at += 1
        return None, calls

    def content_so_far(self, text: str) -> int:
        return _content_unless_calls(text, "{", self.tag)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        return calls_in_sequence(self._body(text), 0, ";", self.argument_keys)

    def _body(self, text: str) -> str:
        return _after_tag(text, self.tag)


class MistralToolParser:
    tag = "[TOOL_CALLS]"
    argument_keys = ("arguments",)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """No content and the calls, where the whole reply is the array of them; else (text, None)."""
        body = self._body(text)
        if not body.startswith("["):
            return text, None
        calls, at = [], space(body, 1)
        while True:
            call, at = whole_call(body, at, self.argument_keys)
            if call is None:
                return text, None
            calls.append(call)
            at = space(body, at)
            if body[at:at + 1] != ",":
                break
            at = space(body, at + 1)
        return (None, calls) if body[at:].strip() == "]" else (text, None)

    def content_so_far(self, text: str) -> int:
        return _content_unless_calls(text, "[", self.tag)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        body = self._body(text)
        return calls_in_sequence(body, 1, ",", self.argument_keys) if body.startswith("[") else []

    def _body(self, text: str) -> str:
        return _after_tag(text, self.tag)


def _content_unless_calls(text: str, opening: str, tag: str) -> int:
    """For a format whose reply is all calls or all text: nothing while the reply may still turn out to be calls
    (it starts with `opening` or the tag, or is the start of the tag); all of it otherwise."""
    start = text.lstrip()
    return 0 if start.startswith((opening, tag)) or tag.startswith(start) else len(text)


def _after_tag(text: str, tag: str) -> str:
    """The reply without its white space and the tag that may open it."""
    return text.strip().removeprefix(tag).lstrip()


ToolCallParser = HermesToolParser | Llama3JsonToolParser | MistralToolParser
TOOL_CALL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser}


def tool_call_parser(name: str | None) -> ToolCallParser | None:
    return TOOL_CALL_PARSERS[name]() if name is not None else None
