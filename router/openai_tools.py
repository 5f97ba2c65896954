"""Tool calls the engine makes without a parser for the model's own tool-call format, as vLLM makes them: the reply
is held by a structured output to the tools' parameter schemas, then handed back as OpenAI's tool calls.

    tool_choice {"type": "function", "function": {"name": N}}   the reply is N's arguments, one JSON object
    tool_choice "required"                                      a JSON array of one or more {"name", "parameters"}
                                                                (one alone with parallel_tool_calls false)
    tool_choice "none"                                          plain text; the tools only reach the template
    tool_choice "auto" (the default with tools)                 refused: which text is a call is up to the model's
                                                                format, which needs a parser (vLLM refuses it too
                                                                unless one is configured)

The tools also go to the chat template, so a model trained for tools sees them as it was trained to.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any

from router.errors import invalid
from workers.engine.sampling_params import StructuredOutput

_ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolChoice:
    """What the reply must be: the arguments of the function `name`, or (name None) a list of calls."""

    name: str | None
    structure: StructuredOutput

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI's tool_calls for a finished reply; None where the text is not a whole call (cut off by
        max_tokens)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.name is not None:
            return [tool_call(self.name, text)]
        return [tool_call(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in value]


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_choice(tools: list[dict] | None, choice: str | dict | None, parallel: bool = True) -> ToolChoice | None:
    """The tool call the request asks for, None for a reply in text; a choice the engine cannot honour is a 400."""
    if not tools or choice == "none":
        if isinstance(choice, dict) or choice == "required":
            raise invalid("tool_choice", "names a tool call, but the request has no tools")
        return None
    schemas = _parameter_schemas(tools)
    if choice is None or choice == "auto":
        raise invalid("tool_choice", "\"auto\" needs a parser for the model's tool-call format, which this server "
                                     "lacks: send \"required\", name a function, or send \"none\"")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in schemas.items()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | ({} if parallel else {"maxItems": 1})
        return ToolChoice(None, StructuredOutput(json=array))
    name = _named(choice)
    if name not in schemas:
        raise invalid("tool_choice", f"names {name!r}, which is not among the request's tools "
                                     f"({', '.join(schemas)})")
    return ToolChoice(name, StructuredOutput(json=schemas[name]))


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
