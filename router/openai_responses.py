"""The OpenAI-compatible API's response shapes: a text or chat completion, whole or as server-sent event chunks,
with OpenAI's usage and logprobs layouts (router/openai_api.py builds the requests and picks the shape)."""

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from router.errors import ApiError, Kind, classify
from router.ingress import GenerateRequest, Ingress
from workers.engine.outputs import RequestOutput, Usage

logger = logging.getLogger(__name__)


class ResponseShape:
    """One request's response in its endpoint's shape: text completion or chat completion, whole or chunked."""

    def __init__(self, ingress: Ingress, request: GenerateRequest, chat: bool):
        self.tokenizer = ingress.tokenizer
        self.chat = chat
        self.top_n = request.params.logprobs
        prefix, self.object = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.header = {"id": f"{prefix}-{request.request_id}", "created": int(time.time()),
                       "model": ingress.model.name}
        self.text_offset = 0  # completions' logprobs.text_offset runs on across chunks

    def response(self, out: RequestOutput) -> dict[str, Any]:
        completion = out.outputs[0]
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(completion.token_ids, completion.logprobs),
                                  "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": completion.text}
        else:
            choice["text"] = completion.text
        return {**self.header, "object": self.object, "choices": [choice], "usage": _usage(out.usage)}

    async def events(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                     include_usage: bool) -> AsyncIterator[str]:
        last = first
        try:
            if self.chat:
                yield self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}, include_usage)
            chunk = self._delta(first, include_usage)
            if chunk:
                yield chunk
            async for last in outputs:
                chunk = self._delta(last, include_usage)
                if chunk:
                    yield chunk
            if include_usage:
                yield _sse({**self.header, "object": self._chunk_object, "choices": [], "usage": _usage(last.usage)})
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = classify(e)
            if error.kind is Kind.INTERNAL:
                logger.exception("request %s failed while streaming", self.header["id"])
            yield _sse({"error": error_body(error)})
        finally:
            await outputs.aclose()

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _delta(self, out: RequestOutput, include_usage: bool) -> str | None:
        completion = out.outputs[0]
        finish_reason = completion.finish_reason if out.finished else None
        new_ids = completion.delta_token_ids
        logprobs = None
        if completion.logprobs is not None and new_ids:
            start = len(completion.token_ids) - len(new_ids)
            logprobs = self._logprobs(new_ids, completion.logprobs[start:start + len(new_ids)])
        if not completion.delta_text and finish_reason is None and logprobs is None:
            return None  # the detokenizer held the text back (a possible stop string): nothing to say yet
        choice: dict[str, Any] = {"logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = completion.stop_reason
        if self.chat:
            choice["delta"] = {"content": completion.delta_text} if completion.delta_text else {}
        else:
            choice["text"] = completion.delta_text
        return self._chunk(choice, include_usage)

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> str:
        chunk = {**self.header, "object": self._chunk_object, "choices": [{"index": 0, **choice}]}
        if include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if logprobs is None:
            return None
        pairs = list(zip(token_ids, logprobs))
        decode = self._decode
        if self.chat:
            return {"content": [{**_entry(decode(t), top.get(t)), "top_logprobs": [
                _entry(decode(k), v) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:self.top_n]]}
                for t, top in pairs]}
        tokens = [decode(t) for t, _ in pairs]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_finite(top.get(t)) for t, top in pairs],
                "top_logprobs": [{decode(k): _finite(v) for k, v in top.items()} for _, top in pairs],
                "text_offset": offsets}

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _usage(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}


def _finite(logprob: float | None) -> float:
    """JSON has no -inf; vLLM's convention is a floor of -9999."""
    return -9999.0 if logprob is None or not math.isfinite(logprob) else max(logprob, -9999.0)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_body(error: ApiError) -> dict[str, Any]:
    return {"message": error.message, "type": error.kind.openai_type, "param": error.field,
            "code": error.kind.http_status}
