"""The OpenAI-compatible API's response shapes for /v1/completions and /v1/chat/completions: a text or chat
completion, whole or as server-sent event chunks, with OpenAI's usage and logprobs layouts (router/openai_api.py
builds the requests and picks the shape; router/responses_shape.py is the Responses API's)."""

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from router.errors import ApiError, Kind, classify
from router.ingress import Ingress
from router.openai_tools import ToolChoice
from router.reasoning import ReasoningParser, ReasoningSplit
from router.streams import merged
from router.tool_call_json import CallDelta, CallStream
from workers.engine.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)


class ResponseShape:
    """One request's response in its endpoint's shape: text completion or chat completion, whole or chunked, with
    one choice per cluster request (n for each prompt, in order)."""

    def __init__(self, ingress: Ingress, request_id: str, chat: bool, top_n: int | None, choices_per_prompt: int,
                 include_usage: bool, continuous_usage: bool = False, echoes: list[str] | None = None,
                 prompt_only: bool = False,
                 tool_choice: ToolChoice | None = None, reasoning: ReasoningParser | None = None, *, model: str):
        """`model`: the name the response gives (the served model's, or the LoRA adapter's the request named)."""
        self.tokenizer = ingress.tokenizer
        self.chat = chat
        self.tool_choice = tool_choice  # chat: how each reply may call tools (router/openai_tools.py)
        self.reasoning = reasoning  # chat: the thinking told from the answer (router/reasoning.py)
        self.splits: dict[int, ReasoningSplit] = {}
        self.content_sent: dict[int, int] = {}  # streaming with tools: characters sent as content, per choice
        self.call_streams: dict[int, CallStream] = {}  # streaming with tools: per choice, what of its calls went out
        self.top_n = top_n
        self.choices_per_prompt = choices_per_prompt
        self.include_usage = include_usage  # streaming: a last chunk with the usage, and "usage": null before it
        self.continuous_usage = continuous_usage  # ... or, before it, each chunk's choice's usage so far
        self.echoes = echoes  # completions' echo: each choice's prompt text, sent ahead of its completion
        self.echoed: set[int] = set()  # choices whose stream has sent its prompt
        self.prompt_only = prompt_only  # echo with max_tokens 0: the generated token is left out
        prefix, self.object = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.header = {"id": f"{prefix}-{request_id}", "created": int(time.time()), "model": model}
        self.text_offsets: dict[int, int] = {}  # completions' logprobs.text_offset runs on across chunks

    async def response(self, outs: list[RequestOutput]) -> dict[str, Any]:
        """A coroutine, as the Responses API's shape is: that one stores what it returns."""
        choices = []
        for index, out in enumerate(outs):
            completion = self._visible(out)
            choice: dict[str, Any] = {
                "index": index, "logprobs": self._logprobs(index, completion.token_ids, completion.logprobs,
                                                           out if self.echoes is not None else None),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
            if self.chat:
                thinking = None
                if self.reasoning is not None:
                    thinking, _, completion = self._answer(index, out, completion)
                choice["message"], choice["finish_reason"] = self._message(completion)
                if self.reasoning is not None:
                    _with_thinking(choice["message"], thinking)
            else:
                choice["text"] = self._echo(index) + completion.text
            choices.append(choice)
        return {**self.header, "object": self.object, "choices": choices, "usage": self._usage(outs)}

    async def events(self, firsts: list[RequestOutput],
                     streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        lasts = list(firsts)
        try:
            if self.chat:
                for index, first in enumerate(firsts):
                    opening = {"role": "assistant", "content": "" if self.tool_choice is None else None}
                    yield self._chunk(index, first, {"delta": opening, "logprobs": None, "finish_reason": None},
                                      opening=True)
            for index, first in enumerate(firsts):
                chunk = self._delta(index, first)
                if chunk:
                    yield chunk
            async with aclosing(merged(streams)) as rest:
                async for index, out in rest:
                    lasts[index] = out
                    chunk = self._delta(index, out)
                    if chunk:
                        yield chunk
            if self.include_usage:
                yield sse({**self.header, "object": self._chunk_object, "choices": [], "usage": self._usage(lasts)})
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = classify(e)
            if error.kind is Kind.INTERNAL:
                logger.exception("request %s failed while streaming", self.header["id"])
            yield sse({"error": error_body(error)})

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _delta(self, index: int, out: RequestOutput) -> str | None:
        completion = self._visible(out)
        finish_reason = completion.finish_reason if out.finished else None
        new_ids = completion.delta_token_ids
        echo = "" if self.echoes is None or index in self.echoed else self._echo(index)
        logprobs = None
        if completion.logprobs is not None and (new_ids or echo):
            start = len(completion.token_ids) - len(new_ids)
            logprobs = self._logprobs(index, new_ids, completion.logprobs[start:start + len(new_ids)],
                                      out if echo else None)
        text = echo + completion.delta_text
        self.echoed.add(index)
        if not text and finish_reason is None and logprobs is None:
            return None  # the detokenizer held the text back (a possible stop string): nothing to say yet
        choice: dict[str, Any] = {"logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = completion.stop_reason
        if self.chat:
            thinking = ""
            if self.reasoning is not None:
                _, thinking, completion = self._answer(index, out, completion)
            delta, finish_reason = self._chat_delta(index, completion, finish_reason)
            if thinking:
                delta = {"reasoning_content": thinking, "reasoning": thinking, **delta}
            if not delta and finish_reason is None and logprobs is None:
                return None
            choice["delta"], choice["finish_reason"] = delta, finish_reason
        else:
            choice["text"] = text
        return self._chunk(index, out, choice)

    def _answer(self, index: int, out: RequestOutput,
                completion: CompletionOutput) -> tuple[str | None, str, CompletionOutput]:
        """A reply's thinking so far (None where it does not think), the part of it not yet streamed, and the
        completion as its answer alone (text and delta_text are the answer's), which tool calls are read from."""
        parts, thinking, answer = self._split(index, out).news(completion.text, completion.finish_reason is not None)
        return parts.reasoning, thinking, replace(completion, text=parts.content, delta_text=answer)

    def _split(self, index: int, out: RequestOutput) -> ReasoningSplit:
        if index not in self.splits:
            self.splits[index] = self.reasoning.split(out.prompt_token_ids)
        return self.splits[index]

    def _message(self, completion: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """A whole reply and its finish reason: its content and tool calls, when it makes any, or its text."""
        if self.tool_choice is None:
            return {"role": "assistant", "content": completion.text}, completion.finish_reason
        content, calls = self.tool_choice.reply(completion.text, completion.finish_reason == "stop")
        if calls is None:
            return {"role": "assistant", "content": content}, completion.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

    def _chat_delta(self, index: int, completion: CompletionOutput,
                    finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A chunk's delta and finish reason. With tools, text streams as content up to where a call may start
        (with "auto", the parser's say; a forced call's reply has none), and each call goes out once its name is
        whole (its id and name), then its arguments as they are generated. At the end, the whole reply decides:
        the rest of its content and of its calls. A reply whose calls began streaming but do not parse in the end
        (a call cut off by max_tokens) ends there, as what was sent cannot be taken back."""
        choice = self.tool_choice
        if choice is None:
            return ({"content": completion.delta_text} if completion.delta_text else {}), finish_reason
        sent = self.content_sent.get(index, 0)
        stream = self.call_streams.setdefault(index, choice.call_stream())
        if finish_reason is None:
            content = completion.text[:choice.text_so_far(completion.text)]
            deltas = stream.deltas(choice.calls_so_far(completion.text))
        else:
            message, finish_reason = self._message(completion)
            calls = message.get("tool_calls") or []
            content = (message["content"] or "") if calls or not stream.ids else ""
            deltas = stream.finish(calls)
        delta: dict[str, Any] = {}
        if content[sent:]:
            delta["content"] = content[sent:]
            self.content_sent[index] = len(content)
        if deltas:
            delta["tool_calls"] = [_tool_call_delta(d) for d in deltas]
        return delta, finish_reason

    def _chunk(self, index: int, out: RequestOutput, choice: dict[str, Any], opening: bool = False) -> str:
        """`opening`: the chunk that opens a chat message, before any of its tokens."""
        chunk = {**self.header, "object": self._chunk_object, "choices": [{"index": index, **choice}]}
        if self.include_usage:
            chunk["usage"] = self._usage_so_far(out, opening) if self.continuous_usage else None
        return sse(chunk)

    def _usage_so_far(self, out: RequestOutput, opening: bool) -> dict[str, int]:
        """vLLM's continuous_usage_stats: a chunk's choice's prompt and the tokens it has generated so far."""
        usage = out.usage
        generated = 0 if self.prompt_only or opening else usage.generated_tokens
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": generated,
                "total_tokens": usage.prompt_tokens + generated}

    def _visible(self, out: RequestOutput) -> CompletionOutput:
        """The completion as the client sees it: none at all when only the prompt was asked for."""
        completion = out.outputs[0]
        if not self.prompt_only:
            return completion
        return replace(completion, text="", token_ids=[], delta_text="", delta_token_ids=[],
                       logprobs=None if completion.logprobs is None else [])

    def _usage(self, outs: list[RequestOutput]) -> dict[str, Any]:
        """Each prompt counts once however many choices it has; every choice's tokens count."""
        prompts = [out.usage for out in outs[::self.choices_per_prompt]]
        prompt_tokens = sum(usage.prompt_tokens for usage in prompts)
        generated = 0 if self.prompt_only else sum(out.usage.generated_tokens for out in outs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated,
                 "prompt_tokens_details": {"cached_tokens": sum(usage.cached_tokens for usage in prompts)}}
        if self.reasoning is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(
                self.reasoning.num_thinking_tokens(out.outputs[0].token_ids, self._split(index, out).parts(
                    out.outputs[0].text, finished=True)) for index, out in enumerate(outs))}
        return usage

    def _echo(self, index: int) -> str:
        return "" if self.echoes is None else self.echoes[index]

    def _logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                  echoed: RequestOutput | None = None) -> dict | None:
        """`echoed`: an output that carries its prompt logprobs, whose prompt tokens come first (echo)."""
        if logprobs is None:
            return None
        if self.chat:
            return {"content": token_logprobs(self.tokenizer, token_ids, logprobs, self.top_n)}
        if echoed is not None and echoed.prompt_logprobs is not None:
            token_ids, logprobs = echoed.prompt_token_ids + token_ids, echoed.prompt_logprobs + logprobs
        pairs = list(zip(token_ids, logprobs))
        decode = self._decode
        tokens = [decode(t) for t, _ in pairs]
        offsets, offset = [], self.text_offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self.text_offsets[index] = offset
        return {"tokens": tokens,
                "token_logprobs": [None if top is None else _finite(top.get(t)) for t, top in pairs],
                "top_logprobs": [None if top is None else {decode(k): _finite(v) for k, v in top.items()}
                                 for _, top in pairs],
                "text_offset": offsets}

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _with_thinking(message: dict[str, Any], thinking: str | None) -> None:
    """A message with its thinking, under vLLM's names for it (reasoning_content, and reasoning since 0.11); a
    reply that thought and gave no answer has content null."""
    message["reasoning_content"] = message["reasoning"] = thinking
    if thinking is not None and not message["content"]:
        message["content"] = None


def token_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                   top_n: int | None) -> list[dict[str, Any]]:
    """Chat's layout, which the Responses API shares: each token with its logprob, bytes and the top_n likeliest."""
    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return [{**_entry(decode(t), top.get(t)), "top_logprobs": [
        _entry(decode(k), v) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:top_n]]}
        for t, top in zip(token_ids, logprobs)]


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}


def _finite(logprob: float | None) -> float:
    """JSON has no -inf; vLLM's convention is a floor of -9999."""
    return -9999.0 if logprob is None or not math.isfinite(logprob) else max(logprob, -9999.0)


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event; the Responses API names each event by its type."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _tool_call_delta(delta: CallDelta) -> dict[str, Any]:
    """A call's delta in a chat chunk: its first carries the call's id and name, the next ones only arguments."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {"index": delta.index, "id": delta.id, "type": "function",
            "function": {"name": delta.name, "arguments": delta.arguments}}


def error_body(error: ApiError) -> dict[str, Any]:
    return {"message": error.message, "type": error.kind.openai_type, "param": error.field,
            "code": error.kind.http_status}
