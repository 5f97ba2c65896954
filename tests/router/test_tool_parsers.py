"""Finding tool calls in a model's text (tool_choice "auto"), whole and while it streams, and what "auto" needs."""

import json
import re

import pytest

from router.errors import ApiError
from router.openai_tools import tool_choice
from router.tool_call_json import CallSoFar
from router.tool_parsers import (
    GraniteToolParser,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def arguments_by_name(calls):
    """Of OpenAI's tool calls."""
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls]


def found(calls: list[CallSoFar]) -> list[tuple[str, dict]]:
    """Of the calls a parser finds."""
    return [(call.name, json.loads(call.arguments)) for call in calls]


def test_text_before_and_calls_in_the_hermes_format_are_found():
    parser = HermesToolParser()
    content, calls = parser.parse("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me look.\n"
    assert found(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    content, calls = parser.parse("\n" + CALL)
    assert content is None and found(calls) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    CALL + '<tool_call>\n{"name": "get_weather", "arguments": {}}',  # the second one cut off before its end tag
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
    assert content is None and found(calls)[0] == ("get_weather", {"city": "Paris"})
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


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]\n',
])
def test_a_mistral_reply_that_is_an_array_of_calls_is_calls_with_or_without_its_special_tag(text):
    content, calls = MistralToolParser().parse(text)
    assert content is None and found(calls)[0] == ("get_weather", {"city": "Paris"})
    assert len(calls) == text.count('"name"')


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}\n', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ('Let me look.[TOOL_CALLS]get_weather[ARGS] {"city": "Paris"}', "Let me look.",
     [("get_weather", {"city": "Paris"})]),
    ('Let me look.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "Let me look.",
     [("get_weather", {"city": "Paris"})]),
])
def test_mistral_v11_calls_are_each_tagged_and_named_before_their_arguments(text, content, calls):
    parsed_content, parsed_calls = MistralToolParser().parse(text)
    assert parsed_content == content and found(parsed_calls) == calls


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    "[1, 2, 3]",  # an array, but not of calls
    '[{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    '[{"name": "get_weather", "arguments": {}}] and then some text',
    '[TOOL_CALLS] {"name": "get_weather", "arguments": {}}',  # not in an array
    "[TOOL_CALLS]get_weather",  # no arguments
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',  # cut off by max_tokens
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and then some text',
    '[TOOL_CALLS]get_weather[ARGS]{}[TOOL_CALLS]',  # a second call that never came
])
def test_a_mistral_reply_that_is_not_all_calls_is_text(text):
    assert MistralToolParser().parse(text) == (text, None)


@pytest.mark.parametrize(("text", "content"), [
    ("It is", "It is"), (" [", ""), ("[TOOL_", ""), ("[TOOL_CALLS] [{", ""), ("", ""), ("(a)", "(a)"),
    ("Let me look.[TOOL_CALLS]get", "Let me look."), ("Let me look. [TOOL_", "Let me look. "),
])
def test_a_mistral_reply_streams_as_content_once_it_cannot_be_calls(text, content):
    assert text[:MistralToolParser().content_so_far(text)] == content


@pytest.mark.parametrize("text", [
    '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ' <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
])
def test_a_granite_reply_that_is_a_tagged_array_of_calls_is_calls(text):
    content, calls = GraniteToolParser().parse(text)
    assert content is None and found(calls)[0] == ("get_weather", {"city": "Paris"})
    assert len(calls) == text.count('"name"')


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    '<tool_call>{"name": "get_weather", "arguments": {}}',  # not in an array
])
def test_a_granite_reply_that_is_not_all_calls_is_text(text):
    assert GraniteToolParser().parse(text) == (text, None)


@pytest.mark.parametrize(("text", "content"), [
    ("It is", "It is"), ("<|tool", ""), ("<tool_", ""), ("<tool_call>[{", ""), ("<b>", "<b>"),
])
def test_a_granite_reply_streams_as_content_once_it_cannot_be_calls(text, content):
    assert text[:GraniteToolParser().content_so_far(text)] == content


@pytest.mark.parametrize(("text", "calls"), [
    ('[get_weather(city="Paris")]', [("get_weather", {"city": "Paris"})]),
    ("<|python_start|>[get_weather(city='Paris', days=3), get_time()]<|python_end|>",
     [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]),
    ('[tools.search(query="a, b) c", filters={"lang": ["en", None]}, exact=True)]',
     [("tools.search", {"query": "a, b) c", "filters": {"lang": ["en", None]}, "exact": True})]),
])
def test_a_pythonic_reply_is_a_list_of_calls_whose_arguments_become_json(text, calls):
    content, found_calls = PythonicToolParser().parse(text)
    assert content is None and found(found_calls) == calls


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.",
    "[1, 2, 3]",  # a list, but not of calls
    '[get_weather("Paris")]',  # a positional argument: its name is unknown
    '[get_weather(city=paris)]',  # a variable, not a literal
    '[get_weather(city="Par',  # cut off by max_tokens
    '[get_weather(city="Paris")] and then some text',
    "[os.system('ls')()]",  # not a function's name
])
def test_a_pythonic_reply_that_is_not_all_calls_is_text(text):
    assert PythonicToolParser().parse(text) == (text, None)


# Whole replies, each with a call whose arguments hold what a scanner could take for their end: braces, quotes and
# the call's own markup inside strings, and an object nested in them. With each, the calls whose arguments go out
# in parts: all but those written before the call's name.
TRICKY = '{"note": "a } or \\"{\\" and </tool_call>", "when": {"day": "today"}}'
STREAMED = {
    "hermes": (dict(parser=HermesToolParser()),
               f'Let me look.\n{CALL}\n<tool_call>\n{{"name": "get_time", "arguments": {TRICKY}}}\n</tool_call>',
               {0, 1}),
    "llama3_json": (dict(parser=Llama3JsonToolParser()),
                    f'<|python_tag|>{{"name": "get_weather", "parameters": {{"city":"Paris"}}}}; '
                    f'{{"parameters": {TRICKY}, "name": "get_time"}}', {0}),
    "mistral": (dict(parser=MistralToolParser()),
                f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}, '
                f'{{"name": "get_time", "arguments": {TRICKY}}}]', {0, 1}),
    "mistral_v11": (dict(parser=MistralToolParser()),
                    f'Let me look.[TOOL_CALLS]get_weather[ARGS]{{"city": "Paris"}}'
                    f'[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{TRICKY}', {0, 1}),
    "granite": (dict(parser=GraniteToolParser()),
                f'<|tool_call|>[{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}, '
                f'{{"name": "get_time", "arguments": {TRICKY}}}]', {0, 1}),
    "pythonic": (dict(parser=PythonicToolParser()),
                 "[get_weather(city='Paris'), get_time(note='a } or \"{\" and </tool_call>', when={'day': 'today'})]",
                 set()),  # arguments go out whole: Python literals are not JSON until they end
    "required": (dict(choice="required"),
                 f'[{{"name": "get_weather", "parameters": {{}}}}, {{"name": "get_time", "parameters": {TRICKY}}}]',
                 {0, 1}),
    "named": (dict(choice={"type": "function", "function": {"name": "get_weather"}}), TRICKY, {0}),
}


@pytest.mark.parametrize("kind", STREAMED)
def test_calls_stream_as_generated_and_add_up_to_the_whole_replys_calls(kind):
    """Each prefix of a reply, as a stream sees it: a call's name shows once whole, its arguments only grow and
    end as the whole reply's, which are the model's own text."""
    arguments, reply, in_parts = STREAMED[kind]
    choice = tool_choice([WEATHER], **{"choice": "auto"} | arguments)
    _, whole = choice.reply(reply, stopped=True)
    assert [json.loads(call["function"]["arguments"]) for call in whole][-1] == json.loads(TRICKY)
    seen, partial = [CallSoFar(None, "")] * len(whole), set()
    for end in range(len(reply) + 1):
        calls = choice.calls_so_far(reply[:end])
        assert len(calls) <= len(whole)
        for i, (call, final) in enumerate(zip(calls, whole)):
            assert call.name in (None, final["function"]["name"])
            assert call.arguments.startswith(seen[i].arguments)
            assert final["function"]["arguments"].startswith(call.arguments)
            if call.name is not None and 0 < len(call.arguments) < len(final["function"]["arguments"]):
                partial.add(i)
            seen[i] = call
    assert [(call.name, call.arguments) for call in seen] == [
        (call["function"]["name"], call["function"]["arguments"]) for call in whole]
    assert partial == in_parts


@pytest.mark.parametrize("kind", ["hermes", "llama3_json", "mistral", "mistral_v11", "granite", "pythonic"])
def test_auto_without_parallel_calls_keeps_the_first_call_whole_or_streamed(kind):
    """The model decides how many calls it makes; parallel_tool_calls false hands back its first alone."""
    parser, text = STREAMED[kind][0]["parser"], STREAMED[kind][1]
    single, parallel = (tool_choice([WEATHER], "auto", allowed, parser) for allowed in (False, True))
    assert len(parallel.reply(text, stopped=True)[1]) == 2 and len(parallel.calls_so_far(text)) == 2
    [call] = single.reply(text, stopped=True)[1]
    assert arguments_by_name([call]) == [("get_weather", {"city": "Paris"})]
    assert [c.name for c in single.calls_so_far(text)] == ["get_weather"]


def test_auto_needs_a_parser_and_the_forced_choices_do_not():
    with pytest.raises(ApiError, match="api.tool_call_parser"):
        tool_choice([WEATHER], "auto")
    with pytest.raises(ApiError, match="api.tool_call_parser"):
        tool_choice([WEATHER], None)
    assert tool_choice([WEATHER], "auto", parser=HermesToolParser()).structure is None
    assert tool_choice([WEATHER], "required").structure is not None
    assert tool_choice([WEATHER], "none") is None and tool_choice(None, None) is None


OPENAI_ID, MISTRAL_ID = r"call_[0-9a-f]{24}", r"[A-Za-z0-9]{9}"
REQUIRED = '[{"name": "get_weather", "parameters": {}}]'


@pytest.mark.parametrize(("parser", "choice", "reply", "kind"), [
    (HermesToolParser(), "auto", CALL, OPENAI_ID),
    (HermesToolParser(), "required", REQUIRED, OPENAI_ID),
    (MistralToolParser(), "auto", '[TOOL_CALLS]get_weather[ARGS]{}', MISTRAL_ID),
    (MistralToolParser(), "required", REQUIRED, MISTRAL_ID),
])
def test_call_ids_are_openais_kind_but_nine_letters_and_digits_for_mistrals_templates(parser, choice, reply, kind):
    """Mistral's chat templates refuse a conversation whose calls have other ids, and they come back in it."""
    tools = tool_choice([WEATHER], choice, parser=parser)
    _, [call] = tools.reply(reply, stopped=True)
    [streamed] = tools.call_stream().deltas(tools.calls_so_far(reply))
    assert call["type"] == "function" and re.fullmatch(kind, call["id"]) and re.fullmatch(kind, streamed.id)
