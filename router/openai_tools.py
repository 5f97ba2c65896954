"""Tool calls, as vLLM makes them. A forced choice needs no knowledge of the model's tool-call format: the reply
is held by a structured output to the tools' parameter schemas, then handed back as OpenAI's tool calls. "auto"
lets the model answer in text or call tools in its own format, which a parser for that format (api.
tool_call_parser, router/tool_parsers.py) finds in the text.

    tool_choice {"type": "function", "function": {"name": N}}   the reply is N's arguments, one JSON object
    tool_choice "required"                                      a JSON array of one or more {"name", "parameters"}
                                                                (one alone with parallel_tool_calls false)
    tool_choice "auto" (the default with tools)                 text, tool calls or both, found by the parser
                                                                (the first call alone with parallel_tool_calls
                                                                false); refused where none is configured, as
                                                                vLLM does
    tool_choice "none"                                          plain text; the tools only reach the template

The tools also go to the chat template, so a model trained for tools sees them as it was trained to. A call's
arguments are the JSON text the model wrote for them, which a stream sends as it is generated
(router/tool_call_json.py reads it).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.errors import invalid
from router.tool_call_json import CallSoFar, CallStream, calls_in_sequence, openai_call_id, space, tool_call
from workers.engine.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from router.tool_parsers import ToolCallParser

_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolChoice:
    """What the reply is: the arguments of the function `name`; (name None) a list of calls; or, with a `parser`
    ("auto"), whatever the model says, calls found in it, the first alone where `parallel` is false (the model
    decides how many it makes; a structure holds "required" to one)."""

    name: str | None
    structure: StructuredOutput | None
    parser: "ToolCallParser | None" = None
    parallel: bool = True
    new_id: Callable[[], str] = openai_call_id  # a call's id, of the kind the model's chat template takes back

    def call_stream(self) -> CallStream:
        return CallStream(self.new_id)

    def text_so_far(self, text: str) -> int:
        """How much of a reply still being generated is surely text, not a call: with "auto", the parser's say; a
        forced call's reply has none (it is the call)."""
        return 0 if self.parser is None else self.parser.content_so_far(text)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        """The calls begun in a reply still being generated, whose arguments a stream sends as they come: with
        "auto", those the parser finds; a named call's reply is its arguments; "required"'s is a list of calls."""
        if self.parser is not None:
            calls = self.parser.calls_so_far(text)
            return calls if self.parallel else calls[:1]
        if self.name is not None:
            return [CallSoFar(self.name, text)] if text else []
        at = space(text, 0)
        return calls_in_sequence(text, at + 1, ",", ("parameters",)) if text[at:at + 1] == "[" else []

    def reply(self, text: str, stopped: bool) -> tuple[str | None, list[dict[str, Any]] | None]:
        """A finished reply's content and OpenAI tool_calls; (text, None) where it holds no whole call (a forced
        call cut off by max_tokens: `stopped` false)."""
        if self.parser is not None:
            content, found = self.parser.parse(text)
            if found is None:
                return content, None
            return content, [tool_call(call, self.new_id()) for call in (found if self.parallel else found[:1])]
        try:
            value = json.loads(text) if stopped else None
        except json.JSONDecodeError:
            value = None
        if value is None:
            return text, None
        return None, [tool_call(call, self.new_id()) for call in self.calls_so_far(text)]


def tool_choice(tools: list[dict] | None, choice: str | dict | None, parallel: bool = True,
                parser: "ToolCallParser | None" = None) -> ToolChoice | None:
    """The tool call the request asks for, None for a reply in text; a choice the engine cannot honour is a 400.
    `parser`: the deployment's, which "auto" needs."""
    if not tools or choice == "none":
        if isinstance(choice, dict) or choice == "required":
            raise invalid("tool_choice", "names a tool call, but the request has no tools")
        return None
    schemas = _parameter_schemas(tools)
    new_id = parser.new_id if parser is not None else openai_call_id
    if choice is None or choice == "auto":
        if parser is None:
            raise invalid("tool_choice", "\"auto\" needs a parser for the model's tool-call format, which this "
                                         "server is not configured with (api.tool_call_parser): send \"required\", "
                                         "name a function, or send \"none\"")
        return ToolChoice(None, None, parser, parallel, new_id)
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in schemas.items()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | ({} if parallel else {"maxItems": 1})
        return ToolChoice(None, StructuredOutput(json=array), new_id=new_id)
    name = _named(choice)
    if name not in schemas:
        raise invalid("tool_choice", f"names {name!r}, which is not among the request's tools "
                                     f"({', '.join(schemas)})")
    return ToolChoice(name, StructuredOutput(json=schemas[name]), new_id=new_id)


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """The tools in chat's layout, which chat templates take: a Responses API tool's fields go under
    "function"."""
    if not tools:
        return None
    return [tool if "function" in tool or tool.get("type") != "function" else
            {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in tools]


def _parameter_schemas(tools: list[dict]) -> dict[str, dict]:
    """{name: parameters schema} of the request's function tools, in chat's layout ({"type": "function",
    "function": {...}}) or the Responses API's (the function's fields inline)."""
    schemas = {}
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise invalid(f"tools[{i}]", "only function tools with a name are supported")
        schemas[function["name"]] = function.get("parameters") or _ANY_OBJECT
    return schemas


def _named(choice: str | dict) -> str:
    """The function a tool_choice names: {"type": "function", "function": {"name"}} (chat) or {"type":
    "function", "name"} (Responses API)."""
    function = choice.get("function", choice) if isinstance(choice, dict) and choice.get("type") == "function" \
        else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", f"must be \"none\", \"auto\", \"required\" or a named function, got "
                                     f"{choice!r}")
    return name
