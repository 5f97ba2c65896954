"""The cluster's HTTP API, OpenAI-compatible, as the ingress serves it through Serve's HTTP proxy.

    POST /v1/completions         prompt (a string or token ids) -> text; stream: true sends server-sent events
    POST /v1/chat/completions    messages, rendered with the model's chat template -> an assistant message
    GET  /v1/models              the one served model
    GET  /health                 "ok", or 503 while the replica drains (no API key)
    GET  /metrics                Prometheus text (router/metrics.py; no API key)

Fields follow OpenAI's, with vLLM's extensions (top_k, ignore_eos, stop_token_ids, request_id) and Tandem's
cache_salt; fields it does not know are ignored, as vLLM does. What the engine cannot do (n > 1, penalties,
echo) is refused with a 400 naming the field rather than silently ignored.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status router/errors.py
gives every failure (the gRPC API says the same in its terms). The first output is awaited before a response
starts, so bad input, an unknown model or a full cluster is an ordinary JSON error even when streaming; a
failure after that is one SSE error event. A client that disconnects closes the ingress's stream, which cancels
the request and frees its KV blocks.
"""

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from router.errors import ApiError, Kind, classify, invalid
from router.ingress import GenerateRequest, Ingress
from router.metrics import CONTENT_TYPE
from router.openai_responses import ResponseShape
from workers.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for /v1/completions; chat defaults to the context


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Body(BaseModel):
    """What both endpoints take; everything optional, and null means the default (clients send nulls)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool | None = False
    request_id: str | None = None
    cache_salt: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


Body = TypeVar("Body", bound=_Body)


class PayloadTooLarge(Exception):
    pass


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a client that disconnected
    included), so the ingress's stream behind it is closed at once, not when the garbage collector gets to it."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def build_http_app(ingress: Ingress) -> FastAPI:
    api = OpenAIApi(ingress)
    app = FastAPI(title="Tandem", summary="OpenAI-compatible API of a Tandem cluster")
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, lambda _, e: error_response(invalid("body", str(e))))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    return app


class OpenAIApi:
    def __init__(self, ingress: Ingress):
        self.ingress = ingress
        self.created = int(time.time())

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionBody, self._completion_request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatBody, self._chat_request, chat=True)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        model = self.ingress.model
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": self.created, "owned_by": "tandem", "root": model.name,
            "parent": None, "max_model_len": model.max_model_len}]})

    async def metrics(self) -> Response:
        return Response(await self.ingress.metrics.render(), media_type=CONTENT_TYPE)

    async def health(self) -> PlainTextResponse:
        if self.ingress.draining:
            return PlainTextResponse("draining", status_code=503)
        return PlainTextResponse("ok")

    async def _serve(self, request: Request, body_type: type[Body],
                     build: Callable[[Body, dict[str, str]], GenerateRequest], chat: bool) -> Response:
        aliases: dict[str, str] = {}  # engine field -> the name this API calls it, for error messages
        try:
            self._authorize(request)
            body = await self._parse(request, body_type)
            generate = build(body, aliases)
        except PayloadTooLarge as e:
            self._count_refused(Kind.INVALID_ARGUMENT)
            return _error_json(413, "invalid_request_error", str(e), None)
        except Exception as e:
            error = _renamed(classify(e), aliases)
            self._count_refused(error.kind)
            return error_response(error)
        try:
            return await self._generate(generate, body, chat)  # from here on Ingress.generate counts the request
        except Exception as e:
            return error_response(_renamed(classify(e), aliases))

    def _count_refused(self, kind: Kind) -> None:
        """A request refused before it reached Ingress.generate still counts in tandem_requests_total."""
        self.ingress.metrics.request_refused(kind.name.lower())

    def _authorize(self, request: Request) -> None:
        key = self.ingress.api.key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(Kind.UNAUTHENTICATED, "a valid API key is required: send 'Authorization: Bearer <key>'")

    async def _parse(self, request: Request, body_type: type[Body]) -> Body:
        limit = self.ingress.api.max_request_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body has {length} bytes; at most {limit} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        try:
            body = body_type.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            error = e.errors(include_url=False)[0]
            path = _field_path(error["loc"])
            raise ApiError(Kind.INVALID_ARGUMENT, f"{path}: {error['msg']}" if path else error["msg"], path) from None
        if body.model_extra:
            logger.debug("ignoring unknown request fields %s", sorted(body.model_extra))
        return body

    def _completion_request(self, body: CompletionBody, aliases: dict[str, str]) -> GenerateRequest:
        if body.echo:
            raise invalid("echo", "echoing the prompt is not supported")
        if body.suffix:
            raise invalid("suffix", "suffixes are not supported")
        if body.best_of not in (None, 1):
            raise invalid("best_of", "only best_of=1 is supported")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise invalid("prompt", f"one prompt per request, got a batch of {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise invalid("prompt", "must not be empty")
        aliases["prompt_token_ids"] = "prompt"
        max_tokens = body.max_tokens if body.max_tokens is not None else min(COMPLETIONS_DEFAULT_MAX_TOKENS,
                                                                             self._max_tokens_cap())
        return self._request(body, self._params(body, max_tokens, body.logprobs),
                             prompt=prompt if isinstance(prompt, str) else None,
                             prompt_token_ids=prompt if isinstance(prompt, list) else None)

    def _chat_request(self, body: ChatBody, aliases: dict[str, str]) -> GenerateRequest:
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        aliases["logprobs"] = "top_logprobs"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, max_tokens if max_tokens is not None else self._max_tokens_cap(), logprobs)
        return self._request(body, params, messages=_messages(body.messages))

    def _max_tokens_cap(self) -> int:
        model_len = self.ingress.model.max_model_len
        return min(self.ingress.api.max_tokens or model_len, model_len)

    @staticmethod
    def _params(body: _Body, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if body.n not in (None, 1):
            raise invalid("n", f"only n=1 is supported, got {body.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0):
                raise invalid(name, f"only 0 is supported, got {getattr(body, name)}")
        given = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "seed", "stop",
                                                        "stop_token_ids") if getattr(body, name) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=bool(body.ignore_eos), **given)

    def _request(self, body: _Body, params: SamplingParams, **prompt) -> GenerateRequest:
        return GenerateRequest(**prompt, params=params, request_id=body.request_id or uuid.uuid4().hex,
                               cache_salt=body.cache_salt, model=body.model)

    async def _generate(self, request: GenerateRequest, body: _Body, chat: bool) -> Response:
        outputs = self.ingress.generate(request)
        try:
            # Bad input, an unknown model, a full cluster: all raise here, before a byte of the response is sent.
            first = await anext(outputs)
        except StopAsyncIteration:
            raise ApiError(Kind.INTERNAL, "the request ended without an output") from None
        except BaseException:
            await outputs.aclose()
            raise
        shape = ResponseShape(self.ingress, request, chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(shape.events(first, outputs, include_usage))
        last = first
        try:
            async for last in outputs:
                pass
        finally:
            await outputs.aclose()
        return JSONResponse(shape.response(last))


def _messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Role/content pairs for the chat template: text parts joined, OpenAI's 'developer' role as 'system'."""
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise invalid(f"messages[{i}].content", "only text content parts are supported")
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or ""})
    return rendered


_NESTED_FIELDS = {"role", "content", "type", "text", "include_usage"}


def _field_path(loc: tuple) -> str | None:
    """A validation error's location as a field path: ('messages', 0, 'content') -> messages[0].content; the
    type tags pydantic adds for unions ('list[int]') are dropped."""
    if not loc:
        return None
    path = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _NESTED_FIELDS:
            path += f".{part}"
        else:
            break
    return path


def _renamed(error: ApiError, aliases: dict[str, str]) -> ApiError:
    """The engine's field name replaced by this API's (prompt_token_ids -> prompt, ...)."""
    if error.field not in aliases:
        return error
    name = aliases[error.field]
    message = name + error.message[len(error.field):] if error.message.startswith(error.field) else error.message
    return ApiError(error.kind, message, name)


def _error_json(status: int, kind: str, message: str, param: str | None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def error_response(error: ApiError) -> JSONResponse:
    if error.kind is Kind.INTERNAL:
        logger.error("request failed: %s", error.message)
    headers = {"www-authenticate": "Bearer"} if error.kind is Kind.UNAUTHENTICATED else None
    return _error_json(error.kind.http_status, error.kind.openai_type, error.message, error.field, headers)


async def _http_exception(_: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error_json(e.status_code, kind, str(e.detail), None, getattr(e, "headers", None))


