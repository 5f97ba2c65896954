"""Structured output as the HTTP API's clients ask for it, turned into the engine's StructuredOutput.

    response_format (chat, completions)  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}},
                                         {"type": "json_object"} or {"type": "text"} (OpenAI's)
    text.format (responses)              {"type": "json_schema", "name", "schema", "strict"}, {"type":
                                         "json_object"} or {"type": "text"} (OpenAI's)
    structured_outputs                   {"json" | "json_object" | "regex" | "choice" | "grammar": ...} (vLLM's)
    guided_json, guided_regex, guided_choice, guided_grammar       (vLLM's older names for the same)

A request names at most one. `strict` is taken either way: the output always follows the schema, as it does in
vLLM. A structure the engine cannot parse is refused with a 400 naming the field the client used.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.errors import invalid
from workers.engine.sampling_params import STRUCTURED_KINDS, StructuredOutput

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """Chat's and completions' response_format; the Responses API's text.format has json_schema's fields inline."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str
    json_schema: JsonSchema | None = None
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


def requested_structure(body: BaseModel, format_field: str | None, response_format: ResponseFormat | None,
                        aliases: dict[str, str]) -> StructuredOutput | None:
    """The structure the body asks for, None for free text; `format_field` is where this endpoint takes OpenAI's
    format (response_format or text.format). Records in `aliases` the field the engine's errors should name."""
    asked = {}
    if response_format is not None and response_format.type != "text":
        asked[format_field] = _from_format(response_format, format_field)
    if getattr(body, "structured_outputs", None):
        asked["structured_outputs"] = {kind: body.structured_outputs[kind] for kind in STRUCTURED_KINDS
                                       if kind in body.structured_outputs}
    for field, kind in _GUIDED.items():
        if getattr(body, field, None) is not None:
            asked[field] = {kind: getattr(body, field)}
    if not asked:
        return None
    if len(asked) > 1:
        raise invalid(sorted(asked)[1], f"give one of {', '.join(sorted(asked))}, not several")
    ((field, kinds),) = asked.items()
    aliases["structured_output"] = field
    return StructuredOutput(**kinds)


def _from_format(fmt: ResponseFormat, field: str) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.type != "json_schema":
        raise invalid(f"{field}.type", f"must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}")
    inner = fmt.json_schema if field == "response_format" else fmt
    where = f"{field}.json_schema.schema" if field == "response_format" else f"{field}.schema"
    if inner is None or inner.schema_ is None:
        raise invalid(where, "a json_schema format needs its JSON schema")
    return {"json": inner.schema_}
