"""Finding tool calls in a model's own text, for tool_choice "auto": the format is the model's, so the parser is
chosen per deployment (api.tool_call_parser), as vLLM's --tool-call-parser is.

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of them, after optional
                  text: Qwen2.5, Qwen3 and the Hermes models
    llama3_json   the whole reply is {"name": ..., "parameters": {...}}, or several separated by ";", optionally
                  after <|python_tag|>: Llama 3.1 and 3.2

Each has `parse(text) -> (content, calls)` for a finished reply and `content_so_far(text)` for one still being
generated: how much of it is surely text, which streams as content while the rest waits for the end.
"""

import json
import re
from typing import Any

from router.openai_tools import tool_call
from router.reasoning import partial_tag_length


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    _call = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """The reply's content (the text before the first call; None if only whitespace) and its tool calls, or
        (text, None) where it makes none or one of them is not a call (not JSON, no name)."""
        first = text.find(self.start)
        if first < 0:
            return text, None
        calls = []
        for body in self._call.findall(text):
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                return text, None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return text, None
            calls.append(tool_call(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)))
        if not calls:
            return text, None
        content = text[:first]
        return (content if content.strip() else None), calls

    def content_so_far(self, text: str) -> int:
        """How much of a reply still being generated is surely content: up to its first call, less any ending
        that may be the start of one."""
        first = text.find(self.start)
        if first >= 0:
            return first
        return len(text) - partial_tag_length(text, self.start)


class Llama3JsonToolParser:
    tag = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """No content and the calls, where the whole reply is calls; else (text, None)."""
        body = text.strip().removeprefix(self.tag).lstrip()
        if not body.startswith("{"):
            return text, None
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                call, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return text, None
            arguments = call.get("parameters", call.get("arguments", {}))
            calls.append(tool_call(call["name"], json.dumps(arguments, ensure_ascii=False)))
            while at < len(body) and body[at] in "; \n\t":
                at += 1
        return None, calls

    def content_so_far(self, text: str) -> int:
        """Nothing while the reply may still turn out to be calls (it starts with "{" or the tag); all of it
        otherwise."""
        start = text.lstrip()
        if start.startswith(("{", self.tag)) or self.tag.startswith(start):
            return 0
        return len(text)


ToolCallParser = HermesToolParser | Llama3JsonToolParser
TOOL_CALL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def tool_call_parser(name: str | None) -> ToolCallParser | None:
    return TOOL_CALL_PARSERS[name]() if name is not None else None
