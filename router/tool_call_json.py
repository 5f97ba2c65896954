"""Tool calls in the JSON text a model writes, read while it is still being generated: a call's name once
whole, and its arguments as the raw JSON text the model wrote for them, so a stream's argument deltas add up to
exactly the arguments of the whole reply (router/tool_parsers.py finds the JSON in each model's format;
router/openai_tools.py in a forced call's reply). A CallStream keeps what of them a stream has sent, for each API
to send in its own shape."""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class CallSoFar:
    """A tool call as far as it has been generated: its name once whole (None before), and the text of its
    arguments so far, which only grows as the reply does, so a stream sends what is new."""

    name: str | None
    arguments: str


def call_so_far(text: str, at: int, argument_keys: tuple[str, ...]) -> tuple[CallSoFar, int | None]:
    """The call in the JSON object that starts at text[at] ("{") and may be cut off, and where the object ends
    (None while it is not whole). Its arguments are the value of the first of `argument_keys` in it: an object
    grows as it is generated; any other value counts once whole."""
    name, arguments = None, ""
    at = space(text, at + 1)
    while at < len(text):
        if text[at] == "}":
            return CallSoFar(name, arguments), at + 1
        try:
            key, at = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            break
        at = space(text, at)
        if text[at:at + 1] != ":":
            break
        start = space(text, at + 1)
        try:
            value, at = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            if key in argument_keys and not arguments and text[start:start + 1] == "{":
                arguments = text[start:]
            break
        if key == "name" and isinstance(value, str) and name is None:
            name = value
        elif key in argument_keys and not arguments:
            arguments = text[start:at]
        at = space(text, at)
        if text[at:at + 1] == ",":
            at = space(text, at + 1)
    return CallSoFar(name, arguments), None


def calls_in_sequence(text: str, at: int, separator: str, argument_keys: tuple[str, ...]) -> list[CallSoFar]:
    """The calls in JSON objects one after another from text[at], `separator` (and white space) between them:
    those whole and the one still being generated."""
    calls = []
    at = space(text, at)
    while text[at:at + 1] == "{":
        call, end = call_so_far(text, at, argument_keys)
        calls.append(call)
        if end is None:
            break
        at = space(text, end)
        while text[at:at + 1] and text[at] in separator:
            at = space(text, at + 1)
    return calls


def whole_call(text: str, at: int, argument_keys: tuple[str, ...]) -> tuple[CallSoFar | None, int]:
    """The whole tool call in the JSON object at text[at], and where the object ends; None where it is no whole
    call (not JSON, not an object, no name)."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        return None, at
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None, end
    call, _ = call_so_far(text, at, argument_keys)
    return CallSoFar(value["name"], call.arguments or "{}"), end


def whole_object(text: str, at: int) -> int | None:
    """Where the JSON object at text[at] ends; None where none starts there or it is not whole."""
    try:
        value, end = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        return None
    return end if isinstance(value, dict) else None


def space(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()


def tool_call(call: CallSoFar, call_id: str) -> dict[str, Any]:
    """A whole call in OpenAI's layout."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def openai_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def mistral_call_id() -> str:
    """Nine letters and digits: Mistral's chat templates refuse a conversation whose tool calls have other ids."""
    return uuid.uuid4().hex[:9]


@dataclass(frozen=True)
class CallDelta:
    """What a stream sends of a call: on its first delta its id and name (None after), and the part of its
    arguments not sent before."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class CallStream:
    """What of a reply's calls a stream has sent: each call goes out once its name is whole, then what is new of
    its arguments as the reply grows."""

    def __init__(self, new_id: Callable[[], str] = openai_call_id) -> None:
        self.new_id = new_id  # the model's kind of call id (ToolChoice.new_id)
        self.ids: list[str] = []  # per call begun, in order
        self.sent: list[int] = []  # per call begun: the characters of its arguments sent

    def deltas(self, calls: list[CallSoFar]) -> list[CallDelta]:
        deltas = []
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self.ids):
                self.ids.append(self.new_id())
                self.sent.append(0)
                deltas.append(CallDelta(i, self.ids[i], call.name, call.arguments))
            elif call.arguments[self.sent[i]:]:
                deltas.append(CallDelta(i, None, None, call.arguments[self.sent[i]:]))
            self.sent[i] = len(call.arguments)
        return deltas

    def finish(self, calls: list[dict[str, Any]]) -> list[CallDelta]:
        """The deltas that complete a whole reply's calls (OpenAI's layout)."""
        return self.deltas([CallSoFar(call["function"]["name"], call["function"]["arguments"]) for call in calls])

    def with_ids(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A whole reply's calls (OpenAI's layout) with the ids this stream gave those it began."""
        return [{**call, "id": self.ids[i]} if i < len(self.ids) else call for i, call in enumerate(calls)]
