"""Finding tool calls in a model's text (tool_choice "auto"), whole and while it streams, and what "auto" needs."""

import json

import pytest

from router.errors import ApiError
from router.openai_tools import tool_choice
from router.tool_parsers import HermesToolParser, Llama3JsonToolParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def arguments_by_name(calls):
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls]


def test_text_before_and_calls_in_the_hermes_format_are_found():
    parser = HermesToolParser()
    content, calls = parser.parse("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me look.\n"
    assert arguments_by_name(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(call["id"].startswith("call_") and call["type"] == "function" for call in calls)
    content, calls = parser.parse("\n" + CALL)
    assert content is None and arguments_by_name(calls) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
])
def test_a_reply_without_a_whole_call_is_text(text):
    assert HermesToolParser().parse(text) == (text, None)


@pytest.mark.parametrize(("text", "content"), [
    ("Hello", "Hello"),
    ("Hello <", "Hello "),
    ("Hello <tool_", "Hello "),
    ("Hello <tool_call>{", "Hello "),
    ("a < b", "a < b"),
    ("<toolbox>", "<toolbox>"),
])
def test_only_text_that_cannot_begin_a_call_streams_as_content(text, content):
    assert text[:HermesToolParser().content_so_far(text)] == content


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}',
    ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}\n',
])
def test_a_llama3_reply_made_of_calls_is_calls(text):
    content, calls = Llama3JsonToolParser().parse(text)
    assert content is None and arguments_by_name(calls)[0] == ("get_weather", {"city": "Paris"})
    assert len(calls) == text.count('"name"')


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '{"city": "Paris"}',  # JSON, but not a call
    '{"name": "get_weather", "parameters": {"city": "Par',  # cut off by max_tokens
    '{"name": "get_weather", "parameters": {}} and then some text',
])
def test_a_llama3_reply_that_is_not_all_calls_is_text(text):
    assert Llama3JsonToolParser().parse(text) == (text, None)


@pytest.mark.parametrize(("text", "content"), [
    ("It is", "It is"), ("  {", ""), ("<|python", ""), ("<|python_tag|>{", ""), (" ", ""), ("<b>", "<b>"),
])
def test_a_llama3_reply_streams_as_content_once_it_cannot_be_a_call(text, content):
    assert text[:Llama3JsonToolParser().content_so_far(text)] == content


def test_auto_needs_a_parser_and_the_forced_choices_do_not():
    with pytest.raises(ApiError, match="api.tool_call_parser"):
        tool_choice([WEATHER], "auto")
    with pytest.raises(ApiError, match="api.tool_call_parser"):
        tool_choice([WEATHER], None)
    assert tool_choice([WEATHER], "auto", parser=HermesToolParser()).structure is None
    assert tool_choice([WEATHER], "required").structure is not None
    assert tool_choice([WEATHER], "none") is None and tool_choice(None, None) is None
