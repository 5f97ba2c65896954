"""Finding tool calls in a model's own text, for tool_choice "auto": the format is the model's, so the parser is
chosen per deployment (api.tool_call_parser), as vLLM's --tool-call-parser is.

    hermes        <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of them, after optional
                  text: Qwen2.5, Qwen3 and the Hermes models
    llama3_json   the whole reply is {"name": ..., "parameters": {...}}, or several separated by ";", optionally
                  after <|python_tag|>: Llama 3.1 and 3.2
    mistral       [TOOL_CALLS] and a JSON array of {"name": ..., "arguments": {...}} (Mistral 7B Instruct v0.3,
                  Mistral Nemo and Small: the tokenizers before v11), or [TOOL_CALLS]name[ARGS]{...} per call, the
                  call's [CALL_ID]id before [ARGS] where the model writes one (v11 on: Mistral Small 3.1 and 3.2,
                  Magistral, Devstral), after optional text. The tags are special tokens, which a reply with
                  tools keeps (skip_special_tokens false); an array of calls is read without its tag too. A call's
                  id is nine letters and digits, which Mistral's chat templates require when it comes back
    granite       the whole reply is <|tool_call|> (Granite 3.0; <tool_call> from 3.1) and a JSON array of
                  {"name": ..., "arguments": {...}}
    pythonic      the whole reply is a Python list of calls with literal keyword arguments,
                  [get_weather(city="Paris"), get_time()], optionally between <|python_start|> and <|python_end|>:
                  Llama 3.2's small models and Llama 4; the arguments become JSON

Each has `parse(text) -> (content, calls)` for a finished reply (the calls whole, without ids), `new_id()` for
the kind of call id the model's template takes back, and, for one still being generated,
`content_so_far(text)`, how much of it is surely text, which streams as content, and `calls_so_far(text)`, the
calls begun in it, whose arguments stream as they are generated.
"""

import ast
import json
import re
import tokenize
from itertools import accumulate

from router.reasoning import partial_tag_length
from router.tool_call_json import (
    CallSoFar,
    call_so_far,
    calls_in_sequence,
    mistral_call_id,
    openai_call_id,
    space,
    whole_call,
    whole_object,
)


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"
    argument_keys = ("arguments",)
    new_id = staticmethod(openai_call_id)

    def parse(self, text: str) -> tuple[str | None, list[CallSoFar] | None]:
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
    new_id = staticmethod(openai_call_id)

    def parse(self, text: str) -> tuple[str | None, list[CallSoFar] | None]:
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
    new_id = staticmethod(mistral_call_id)

    def parse(self, text: str) -> tuple[str | None, list[CallSoFar] | None]:
        """The text before the calls (None if only whitespace) and the calls, where the rest of the reply is
        calls; else (text, None)."""
        content, body = self._split(text)
        if body.startswith("["):
            calls = _call_array(body, self.argument_keys)
        elif self.tag in text:
            calls = [self._named(part) for part in body.split(self.tag)]
        else:
            calls = None
        if calls is None or None in calls:
            return text, None
        return (content if content.strip() else None), calls

    def content_so_far(self, text: str) -> int:
        """Up to the tag; nothing of a reply that opens as an array may be (or as the tag's start); all but an
        ending that may be the tag's start otherwise."""
        tag = text.find(self.tag)
        if tag >= 0:
            return tag
        if text.lstrip().startswith("["):
            return 0
        return len(text) - partial_tag_length(text, self.tag)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        _, body = self._split(text)
        if body.startswith("["):
            return calls_in_sequence(body, 1, ",", self.argument_keys)
        if self.tag not in text:
            return []
        return [self._named_so_far(part) for part in body.split(self.tag)]

    def _split(self, text: str) -> tuple[str, str]:
        """The text before the tag, and what follows it (the whole reply where it has no tag), without white
        space at the start."""
        tag = text.find(self.tag)
        if tag < 0:
            return "", text.lstrip()
        return text[:tag], text[tag + len(self.tag):].lstrip()

    def _named(self, part: str) -> CallSoFar | None:
        """The call one [TOOL_CALLS] opens in the v11 format, None where it is not whole or more follows it."""
        name, start = self._name(part)
        end = whole_object(part, start) if name is not None else None
        if end is None or part[end:].strip():
            return None
        return CallSoFar(name, part[start:end])

    def _named_so_far(self, part: str) -> CallSoFar:
        """Its name once [CALL_ID], [ARGS] or the arguments follow it, and its arguments as far as written
        (white space and what may be the start of the next tag at their end left for later)."""
        name, start = self._name(part)
        if name is None:
            return CallSoFar(None, "")
        end = whole_object(part, start)
        if end is not None:
            return CallSoFar(name, part[start:end])
        arguments = part[start:].rstrip()
        return CallSoFar(name, arguments[:len(arguments) - partial_tag_length(arguments, self.tag)])

    def _name(self, part: str) -> tuple[str | None, int]:
        """A v11 call's name and where its arguments start; (None, 0) until what follows the name shows it is
        whole."""
        found = _NAMED_CALL.match(part)
        if found is None:
            return None, 0
        return found["name"], found.end()


# A v11 call up to its arguments: the function's name, the id the model may give it, then [ARGS] (or the object
# itself, where the tags were left out of the text).
_NAMED_CALL = re.compile(r"\s*(?P<name>[\w.\-]+)\s*(?:\[CALL_ID\]\s*\w+\s*)?(?:\[ARGS\]\s*|(?=\{))")


class GraniteToolParser:
    tags = ("<|tool_call|>", "<tool_call>")
    argument_keys = ("arguments",)
    new_id = staticmethod(openai_call_id)

    def parse(self, text: str) -> tuple[str | None, list[CallSoFar] | None]:
        """No content and the calls, where the whole reply is the array of them; else (text, None)."""
        body = self._body(text)
        calls = _call_array(body, self.argument_keys) if body.startswith("[") else None
        return (text, None) if calls is None else (None, calls)

    def content_so_far(self, text: str) -> int:
        return min(_content_unless_calls(text, "[", tag) for tag in self.tags)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        body = self._body(text)
        return calls_in_sequence(body, 1, ",", self.argument_keys) if body.startswith("[") else []

    def _body(self, text: str) -> str:
        body = text.strip()
        for tag in self.tags:
            body = body.removeprefix(tag)
        return body.lstrip()


class PythonicToolParser:
    tag = "<|python_start|>"
    new_id = staticmethod(openai_call_id)

    def parse(self, text: str) -> tuple[str | None, list[CallSoFar] | None]:
        """No content and the calls, where the whole reply is a Python list of calls with literal keyword
        arguments; else (text, None)."""
        body = self._body(text)
        tree = _expression(body) if body.startswith("[") else None
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, None
        calls = [_literal_call(node) for node in tree.elts]
        return (text, None) if None in calls else (None, calls)

    def content_so_far(self, text: str) -> int:
        return _content_unless_calls(text, "[", self.tag)

    def calls_so_far(self, text: str) -> list[CallSoFar]:
        """Each call once its name and "(" are written; its arguments, as JSON, once the call is whole (a Python
        literal cannot be turned into JSON a piece at a time)."""
        body = self._body(text)
        calls, at = [], 1
        while body.startswith("[") and (named := _CALL_NAME.match(body, at)) is not None:
            end = _call_end(body, named.start(1))
            call = None if end is None else _literal_call(_expression(body[named.start(1):end]))
            calls.append(call or CallSoFar(named[1], ""))
            if call is None:
                break
            at = space(body, end)
            if body[at:at + 1] != ",":
                break
            at += 1
        return calls

    def _body(self, text: str) -> str:
        return _after_tag(text, self.tag).removesuffix("<|python_end|>").rstrip()


# A call in a Python list, up to its opening parenthesis: the function's (possibly dotted) name.
_CALL_NAME = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")


def _call_end(body: str, start: int) -> int | None:
    """Where the call that starts at body[start] ends (after its closing parenthesis); None while it is not whole.
    Python's tokenizer reads it, so brackets inside string arguments do not count."""
    lines = body[start:].splitlines(keepends=True)
    line_starts = list(accumulate((len(line) for line in lines[:-1]), initial=start))
    depth = 0
    try:
        for token in tokenize.generate_tokens(iter(lines).__next__):
            if token.type == tokenize.ERRORTOKEN and not token.string.isspace():  # a string still open
                return None
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
                if depth == 0:
                    row, column = token.end
                    return line_starts[row - 1] + column
    except (tokenize.TokenError, SyntaxError, StopIteration):
        return None
    return None


def _expression(text: str) -> ast.expr | None:
    """The Python expression the text is, parsed, never run; None where it is none."""
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _literal_call(node: ast.expr | None) -> CallSoFar | None:
    """A call with keyword arguments of literal values, its arguments as a JSON object; None for anything else."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)) or node.args or \
            any(k.arg is None for k in node.keywords):
        return None
    try:
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return CallSoFar(ast.unparse(node.func), json.dumps(arguments, ensure_ascii=False))
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


def _call_array(body: str, argument_keys: tuple[str, ...]) -> list[CallSoFar] | None:
    """The calls of a reply that is a JSON array of them (from "[" at body[0]), None where it is anything else."""
    calls, at = [], space(body, 1)
    while True:
        call, at = whole_call(body, at, argument_keys)
        if call is None:
            return None
        calls.append(call)
        at = space(body, at)
        if body[at:at + 1] != ",":
            break
        at = space(body, at + 1)
    return calls if body[at:].strip() == "]" else None


def _content_unless_calls(text: str, opening: str, tag: str) -> int:
    """For a format whose reply is all calls or all text: nothing while the reply may still turn out to be calls
    (it starts with `opening` or the tag, or is the start of the tag); all of it otherwise."""
    start = text.lstrip()
    return 0 if start.startswith((opening, tag)) or tag.startswith(start) else len(text)


def _after_tag(text: str, tag: str) -> str:
    """The reply without its white space and the tag that may open it."""
    return text.strip().removeprefix(tag).lstrip()


ToolCallParser = HermesToolParser | Llama3JsonToolParser | MistralToolParser | GraniteToolParser | PythonicToolParser
TOOL_CALL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser,
                     "granite": GraniteToolParser, "pythonic": PythonicToolParser}


def tool_call_parser(name: str | None) -> ToolCallParser | None:
    return TOOL_CALL_PARSERS[name]() if name is not None else None
