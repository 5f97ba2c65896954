"""The Responses API's shape (POST /v1/responses): one response object holding one assistant message, its
function calls when the request has tools to call, or both, whole or as OpenAI's typed stream of events
(router/openai_api.py builds the request; router/openai_responses.py shapes the older endpoints). With a
reasoning parser (router/reasoning.py), a reply that thinks has a `reasoning` item (its text as reasoning_text
content) before the message, and its thinking counts in output_tokens_details.reasoning_tokens.

A stream goes: response.created, response.in_progress, response.output_item.added, response.content_part.added, a
response.output_text.delta per release of text, then the .done events of the text, the part and the item, and last
response.completed, or response.incomplete when max_output_tokens cut the answer short. A reasoning item comes
first: response.output_item.added, a response.reasoning_text.delta per release of thinking, then
response.reasoning_text.done and response.output_item.done once the thinking is over. Every event has a
sequence_number and its type both as the SSE event name and in its data. Function calls follow the message: with
tool_choice "auto" the message's text streams up to where a call may start (as the parser says), while a forced
call's reply has no text to stream. Once the first call's name is whole, the message is done; each call is a
response.output_item.added, then a response.function_call_arguments.delta per release of its arguments, and once
the reply is whole, .done and response.output_item.done. A call cut off by max_output_tokens ends incomplete with
the arguments it had. A failure after the stream started is an `error` event followed by response.failed. A
finished response is stored (router/response_store.py) before the client sees its end, so the next turn can
continue from it at once, and one that failed is stored as failed; with store: false, or no store, neither is. A
background response (router/background.py) is created queued, and its shape saves each state it reaches.
"""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from itertools import takewhile
from typing import Any

from router.errors import ApiError, Kind, classify
from router.ingress import Ingress
from router.openai_responses import error_body, sse, token_logprobs
from router.openai_tools import ToolChoice
from router.reasoning import Parts, ReasoningParser, ReasoningSplit
from router.streams import merged
from router.tool_call_json import CallSoFar, CallStream, tool_call
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


Save = Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[bool]]  # (response, conversation) -> stored?


class ResponsesShape:
    def __init__(self, ingress: Ingress, request_id: str, params: SamplingParams, echoed: dict[str, Any],
                 save: Save | None, conversation: list[dict[str, Any]],
                 tool_choice: ToolChoice | None = None, reasoning: ReasoningParser | None = None):
        """`echoed`: the request's settings a response object repeats (model, instructions, metadata, tools, ...);
        `save`: stores the response as it ends (None: it is not stored); `conversation`: the messages the reply
        answers, stored with it for a continuation; `tool_choice`: how the reply may call tools
        (router/openai_tools.py); `reasoning`: how its thinking is told from its answer (router/reasoning.py)."""
        self.tokenizer = ingress.tokenizer
        self.params = params
        self.tool_choice = tool_choice
        self.reasoning = reasoning
        self.split: ReasoningSplit | None = None
        self.save = save
        self.conversation = conversation
        self.message_id = f"msg_{request_id}"
        self.reasoning_id = f"rs_{request_id}"
        # Streaming: which items are open or done, and how much of each text has gone out.
        self.thinking_started = self.thinking_done = self.message_started = False
        self.thinking_sent = self.answer_sent = 0
        self.message_index = 0  # 1 where a reasoning item comes first
        self.message_done: dict[str, Any] | None = None  # the message, closed as the first call began
        # What of the reply's calls went out.
        self.calls = tool_choice.call_stream() if tool_choice is not None else CallStream()
        self.header = {"id": f"resp_{request_id}", "object": "response", "created_at": int(time.time()),
                       "max_output_tokens": params.max_tokens,
                       "temperature": params.temperature, "top_p": params.top_p, "top_logprobs": params.logprobs,
                       "store": save is not None, **echoed}
        self.sequence_number = 0
        self.tokens_sent = 0  # tokens whose logprobs a delta carried: text held back carries its tokens later

    async def response(self, outs: list[RequestOutput]) -> dict[str, Any]:
        [out] = outs
        completion = out.outputs[0]
        incomplete = completion.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        parts = self._parts(out)
        answer_start = self._answer_start(completion.token_ids, parts)
        content, calls, cut = parts.content, None, []
        if self.tool_choice is not None:
            content, calls = self.tool_choice.reply(parts.content, completion.finish_reason == "stop")
            if calls is None:  # calls begun but not whole (cut off by max_output_tokens): they end incomplete
                cut = [tool_call(call, self.tool_choice.new_id()) for call in takewhile(
                    lambda call: call.name is not None, self.tool_choice.calls_so_far(content))]
            calls, cut = calls and self.calls.with_ids(calls), self.calls.with_ids(cut)
        output = [] if parts.reasoning is None else [self._reasoning_item("completed", parts.reasoning)]
        text = content[:self.tool_choice.text_so_far(content)] if cut else content
        if self.message_done is not None:
            output.append(self.message_done)
        elif text is not None and (text.strip() if cut else (text or parts.reasoning is None)):
            # The text before tool calls has no logprobs of its own.
            logprobs = [] if calls or cut else self._logprobs(completion.token_ids, completion.logprobs, answer_start)
            output.append(self._item(status, [self._part(text, logprobs)]))
        output += [_function_call(call) for call in calls or []]
        output += [_function_call(call, "incomplete") for call in cut]
        response = self._response(status, output, usage=_usage(out, answer_start),
                                  incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                                  completed_at=None if incomplete else int(time.time()))
        if self.save is not None:
            reply = {"role": "assistant", "content": content or ""} | ({"tool_calls": calls} if calls else {})
            response["store"] = await self.save(response, [*self.conversation, reply])
        return response

    @property
    def response_id(self) -> str:
        return self.header["id"]

    def pending(self, status: str) -> dict[str, Any]:
        """The response before its output: queued, or in progress."""
        return self._response(status, [])

    async def fail(self, error: ApiError) -> list[str]:
        """A response that failed: stored as failed, and the events that end its stream (an `error` event, then
        response.failed)."""
        body = error_body(error)
        failed = self._response("failed", [], error={
            "code": "server_error" if error.kind is Kind.INTERNAL else body["type"], "message": body["message"]})
        if self.save is not None:
            await self.save(failed, self.conversation)
        return [self._event("error", code=str(body["code"]), message=body["message"], param=body["param"]),
                self._event("response.failed", response=failed)]

    async def events(self, firsts: list[RequestOutput],
                     streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        [last] = firsts
        try:
            created = "queued" if self.header["background"] else "in_progress"
            yield self._event("response.created", response=self._response(created, []))
            yield self._event("response.in_progress", response=self._response("in_progress", []))
            for event in self._deltas(last):
                yield event
            async with aclosing(merged(streams)) as rest:
                async for _, last in rest:
                    for event in self._deltas(last):
                        yield event
            done = await self.response([last])
            for index, item in enumerate(done["output"]):
                for event in self._item_done(item, index):
                    yield event
            yield self._event(f"response.{done['status']}", response=done)
        except Exception as e:
            error = classify(e)
            if error.kind is Kind.INTERNAL:
                logger.exception("response %s failed while streaming", self.response_id)
            for event in await self.fail(error):
                yield event

    def _parts(self, out: RequestOutput) -> Parts:
        """The reply so far as thinking and answer; without a reasoning parser, all answer."""
        completion = out.outputs[0]
        if self.reasoning is None:
            return Parts(None, completion.text, True)
        if self.split is None:
            self.split = self.reasoning.split(out.prompt_token_ids)
        return self.split.parts(completion.text, completion.finish_reason is not None)

    def _answer_start(self, token_ids: list[int], parts: Parts) -> int:
        """The index of the answer's first token, for its logprobs and the usage's reasoning tokens."""
        return 0 if self.reasoning is None else self.reasoning.num_thinking_tokens(token_ids, parts)

    def _streamable(self, answer: str) -> str:
        """How much of the answer so far can go out as message text: all of it; with tool_choice "auto", what the
        parser says is surely text, once it holds more than whitespace (a reply that is only calls has no
        message); with a forced call, none (the answer is the call)."""
        if self.tool_choice is None:
            return answer
        text = answer[:self.tool_choice.text_so_far(answer)]
        return text if self.message_started or text.strip() else ""

    def _deltas(self, out: RequestOutput) -> list[str]:
        """The events a new output makes: the reasoning item opened and its text, closed once the thinking is over,
        then the message opened and its text. Text not released yet (a possible stop string or tag held back)
        waits, and its tokens' logprobs with it; function calls go out once the reply is whole."""
        completion, parts, events = out.outputs[0], self._parts(out), []
        if parts.reasoning is not None and not self.thinking_done:
            events += self._reasoning_started()
            if parts.reasoning[self.thinking_sent:]:
                events.append(self._event("response.reasoning_text.delta", **self._at_thinking(),
                                          delta=parts.reasoning[self.thinking_sent:]))
                self.thinking_sent = len(parts.reasoning)
            if parts.answering:
                events += self._item_done(self._reasoning_item("completed", parts.reasoning), 0)
        answer = self._streamable(parts.content)
        if answer[self.answer_sent:]:
            events += self._message_started()
            start = max(self.tokens_sent, self._answer_start(completion.token_ids, parts))
            self.tokens_sent = len(completion.token_ids)
            events.append(self._event("response.output_text.delta", **self._at(), delta=answer[self.answer_sent:],
                                      logprobs=self._logprobs(completion.token_ids, completion.logprobs, start)))
            self.answer_sent = len(answer)
        if self.tool_choice is not None and parts.answering:
            events += self._call_deltas(answer, self.tool_choice.calls_so_far(parts.content))
        return events

    def _call_deltas(self, text: str, calls: list[CallSoFar]) -> list[str]:
        """Each call begun in the reply, once its name is whole: the message closed before the first (its `text`
        is all there is: the rest of the reply is calls), the call's item opened, then its arguments as they
        are generated."""
        events = []
        for delta in self.calls.deltas(calls):
            if delta.index == 0 and delta.id is not None and self.message_started:
                message = self._item("completed", [self._part(text, [])])
                events += self._item_done(message, self.message_index)
                self.message_done = message
            at = self._call_index(delta.index)
            if delta.id is not None:
                call = {"id": delta.id, "function": {"name": delta.name, "arguments": ""}}
                events.append(self._event("response.output_item.added", output_index=at,
                                          item=_function_call(call, "in_progress")))
            if delta.arguments:
                events.append(self._event("response.function_call_arguments.delta", output_index=at,
                                          item_id=_item_id(self.calls.ids[delta.index]), delta=delta.arguments))
        return events

    def _call_index(self, i: int) -> int:
        """The output index of the reply's call i: after the reasoning item and the message, where they are."""
        return self.message_index + (self.message_done is not None) + i

    def _reasoning_started(self) -> list[str]:
        """The reasoning item's opening event, the first time; it comes first, so the message follows at 1."""
        if self.thinking_started:
            return []
        self.thinking_started, self.message_index = True, 1
        return [self._event("response.output_item.added", output_index=0,
                            item=_started(self._reasoning_item("in_progress", "")))]

    def _message_started(self) -> list[str]:
        if self.message_started:
            return []
        self.message_started = True
        return [self._event("response.output_item.added", output_index=self.message_index,
                            item=self._item("in_progress", [])),
                self._event("response.content_part.added", **self._at(), part=self._part("", []))]

    def _item_done(self, item: dict[str, Any], index: int) -> list[str]:
        """The events that close an item of the reply at output `index`: the part of its text not streamed yet,
        then its .done events (an item nothing of which was streamed is opened first)."""
        if item["type"] == "function_call":
            at = {"item_id": item["id"], "output_index": index}
            streamed = item["call_id"] in self.calls.ids
            sent = self.calls.sent[self.calls.ids.index(item["call_id"])] if streamed else 0
            events = [] if streamed else [
                self._event("response.output_item.added", output_index=index, item=_started(item))]
            if item["arguments"][sent:] or not streamed:
                events.append(self._event("response.function_call_arguments.delta", **at,
                                          delta=item["arguments"][sent:]))
            return events + [self._event("response.function_call_arguments.done", **at, arguments=item["arguments"]),
                             self._event("response.output_item.done", output_index=index, item=item)]
        if item["type"] == "message" and self.message_done is not None:
            return []  # closed as the first call began
        [part] = item["content"]
        if item["type"] == "reasoning":
            if self.thinking_done:
                return []
            events = self._reasoning_started()
            if part["text"][self.thinking_sent:]:
                events.append(self._event("response.reasoning_text.delta", **self._at_thinking(),
                                          delta=part["text"][self.thinking_sent:]))
            self.thinking_done = True
            return events + [self._event("response.reasoning_text.done", **self._at_thinking(), text=part["text"]),
                             self._event("response.output_item.done", output_index=index, item=item)]
        events = self._message_started()
        if part["text"][self.answer_sent:]:
            # What was held back (a possible call that was text after all), or all of a reply sent whole.
            events.append(self._event("response.output_text.delta", **self._at(), delta=part["text"][self.answer_sent:],
                                      logprobs=part["logprobs"] if not self.answer_sent else []))
        return events + [
            self._event("response.output_text.done", **self._at(), text=part["text"], logprobs=part["logprobs"]),
            self._event("response.content_part.done", **self._at(), part=part),
            self._event("response.output_item.done", output_index=index, item=item)]

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                  start: int = 0) -> list[dict[str, Any]]:
        """The logprobs of the tokens from `start` on; [] when the request asked for none."""
        if logprobs is None:
            return []
        return token_logprobs(self.tokenizer, token_ids[start:], logprobs[start:len(token_ids)], self.params.logprobs)

    def _reasoning_item(self, status: str, text: str) -> dict[str, Any]:
        return {"id": self.reasoning_id, "type": "reasoning", "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def _item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

    def _at(self) -> dict[str, Any]:
        """Where the message's text goes: after the reasoning item, where the reply thought."""
        return {"item_id": self.message_id, "output_index": self.message_index, "content_index": 0}

    def _at_thinking(self) -> dict[str, Any]:
        return {"item_id": self.reasoning_id, "output_index": 0, "content_index": 0}

    def _response(self, status: str, output: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return {**self.header, "status": status, "output": output, "error": None, "incomplete_details": None,
                "usage": None, **fields}

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse(event, event=kind)


def _function_call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A chat tool call as a Responses API output item."""
    return {"id": _item_id(call["id"]), "type": "function_call", "status": status,
            "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _item_id(call_id: str) -> str:
    return f"fc_{call_id.removeprefix('call_')}"


def _started(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as response.output_item.added announces it: in progress, nothing in it yet."""
    empty = {"arguments": ""} if item["type"] == "function_call" else {"content": []}
    return {**item, "status": "in_progress", **empty}


def _usage(out: RequestOutput, reasoning_tokens: int) -> dict[str, Any]:
    usage = out.usage
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.generated_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.generated_tokens}


def input_items(response_id: str, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a response answered (the turns before it included, the request's instructions not), as the Responses
    API's items, oldest first: GET /v1/responses/{id}/input_items lists them. An item's id is the response's and
    its place, so every listing of the response pages alike."""
    base = response_id.removeprefix("resp_")
    items = []
    for message in conversation:
        if message["role"] == "tool":
            items.append({"id": f"fco_{base}_{len(items)}", "type": "function_call_output", "status": "completed",
                          "call_id": message.get("tool_call_id"), "output": message["content"]})
            continue
        calls = message.get("tool_calls") or []
        if message["content"] or not calls:
            kind = "output_text" if message["role"] == "assistant" else "input_text"
            part = {"type": kind, "text": message["content"]} | ({"annotations": []} if kind == "output_text" else {})
            items.append({"id": f"msg_{base}_{len(items)}", "type": "message", "status": "completed",
                          "role": message["role"], "content": [part]})
        items += [_function_call(call) for call in calls]
    return items
