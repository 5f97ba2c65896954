"""The cluster's HTTP API, OpenAI-compatible, as the ingress serves it through Serve's HTTP proxy.

    POST /v1/completions         prompt (a string or token ids, or a batch of them) -> text; stream: true sends
                                 server-sent events
    POST /v1/chat/completions    messages, rendered with the model's chat template -> an assistant message
    POST /v1/responses           OpenAI's Responses API: input (text or messages) and instructions -> a response
                                 with one assistant message; stream: true sends its typed events. Responses are
                                 stored in the cluster's Redis for api.response_ttl_s (unless store: false), so
                                 previous_response_id continues a conversation, GET or DELETE
                                 /v1/responses/{id} retrieves or deletes one (router/response_store.py) and
                                 GET /v1/responses/{id}/input_items lists what it answered, a page at a time.
                                 background: true accepts it at once and runs it detached (router/background.py):
                                 GET polls it, GET ?stream=true&starting_after=N streams its events again (if it
                                 was created streaming), POST /v1/responses/{id}/cancel stops it
    POST /v1/responses/input_tokens  OpenAI's: how many tokens a Responses API request's prompt has (its
                                 instructions, the conversation it continues, its input and tools), unrun
    POST /v1/embeddings, /v1/score, /v1/rerank, /classify (and their other paths)  embeddings, the
                                 cosines of theirs that score and rerank, a classifier's classes
                                 (router/openai_pooling.py)
    GET  /v1/models              the one served model (GET /v1/models/{model}: that model alone)
    POST /tokenize               vLLM's: a prompt or messages -> the token ids the model would see
    POST /detokenize             vLLM's: token ids -> text
    GET  /health                 "ok", or 503 while the replica drains (no API key)
    GET  /version                vLLM's: {"version": Tandem's} (no API key)
    GET  /metrics                Prometheus text (router/metrics.py; no API key)

Fields (router/openai_bodies.py) follow OpenAI's, with vLLM's extensions (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output, skip_special_tokens, allowed_token_ids,
bad_words, truncate_prompt_tokens, request_id; for chat, add_generation_prompt, continue_final_message and
chat_template_kwargs) and Tandem's cache_salt; fields it does not know are ignored, as vLLM does. Structured
output comes as OpenAI's response_format (text.format for responses) or vLLM's structured_outputs
(router/openai_structured.py); a named or required tool_choice is a tool call held to the tool's schema, and "auto"
finds calls in the model's own format with api.tool_call_parser (router/openai_tools.py). What the engine cannot do
(suffix, best_of, images) is refused with a 400 naming the field rather than silently ignored. With
api.reasoning_parser, a reasoning model's thinking comes apart from its answer (router/reasoning.py). echo puts
the prompt before each completion and, with logprobs, the prompt tokens' logprobs before the completion's (the
first one null), as OpenAI's legacy completions did and evaluation harnesses score prompts with; with max_tokens
0, the prompt alone.

n > 1 and a batch of prompts are one cluster request per choice (choice index = prompt index * n + i), each
routed on its own; a seeded request's choice i uses seed + i, as vLLM does. Usage counts each prompt once.

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
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from importlib.metadata import version as package_version
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from router.background import BackgroundResponses
from router.errors import ApiError, Kind, classify, invalid, renamed
from router.http_errors import PayloadTooLarge, error_response, http_exception_response, refused_response
from router.ingress import GenerateRequest, Ingress
from router.metrics import CONTENT_TYPE
from router.openai_bodies import (
    ChatBody,
    ChatMessage,
    CompletionBody,
    DetokenizeBody,
    GenerationBody,
    InputItem,
    InputTokensBody,
    LoadLoRABody,
    ResponsesBody,
    TokenizeBody,
    UnloadLoRABody,
)
from router.openai_pooling import PoolingApi
from router.openai_responses import ResponseShape
from router.openai_structured import ResponseFormat, requested_structure
from router.openai_tools import ToolChoice, chat_tools, tool_choice
from router.response_store import RUNNING, ResponseStore, StoredResponse
from router.responses_shape import ResponsesShape, input_items
from router.streams import close_all, first_of_each, lasts
from router.tool_parsers import tool_call_parser
from workers.engine.sampling_params import SamplingParams, StructuredOutput

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) for /v1/completions; chat defaults to the context


Body = TypeVar("Body", bound=BaseModel)
Shape = ResponseShape | ResponsesShape
Built = tuple[list[dict], SamplingParams, ToolChoice | None]  # a request's prompts, params and tool choice


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a client that disconnected
    included), so the ingress's stream behind it is closed at once, not when the garbage collector gets to it."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[], Awaitable[None]] | None = None):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self._close is not None:
                await self._close()  # the requests' streams, even when the events never started


def build_http_app(ingress: Ingress) -> FastAPI:
    api = OpenAIApi(ingress)
    pooling = PoolingApi(ingress, api.read)
    app = FastAPI(title="Tandem", summary="OpenAI-compatible API of a Tandem cluster")
    app.add_exception_handler(HTTPException, http_exception_response)
    app.add_exception_handler(RequestValidationError, lambda _, e: error_response(invalid("body", str(e))))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/responses", api.responses, methods=["POST"])
    app.add_api_route("/v1/responses/input_tokens", api.input_tokens, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", api.stored_response, methods=["GET", "DELETE"])
    app.add_api_route("/v1/responses/{response_id}/input_items", api.list_input_items, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}/cancel", api.cancel_response, methods=["POST"])
    app.add_api_route("/v1/embeddings", pooling.embeddings, methods=["POST"])
    for path in ("/v1/score", "/score"):
        app.add_api_route(path, pooling.score, methods=["POST"])
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.add_api_route(path, pooling.rerank, methods=["POST"])
    for path in ("/classify", "/v1/classify"):
        app.add_api_route(path, pooling.classify, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/load_lora_adapter", api.load_lora_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", api.unload_lora_adapter, methods=["POST"])
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/version", api.version, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    if ingress.api.origins:
        # A browser asks before a cross-origin call with an API key (a preflight): answered here, before any route,
        # so the preflight needs no key; the call itself still does.
        app.add_middleware(CORSMiddleware, allow_origins=ingress.api.origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


class OpenAIApi:
    def __init__(self, ingress: Ingress):
        self.ingress = ingress
        self.created = int(time.time())
        store_url = ingress.api.response_store_url or ingress.redis_url
        self.store = ResponseStore(store_url, ingress.api.response_ttl_s) if store_url else None
        self.background = BackgroundResponses(ingress, self.store) if self.store is not None else None
        self.tool_parser = tool_call_parser(ingress.api.tool_call_parser)  # tool_choice "auto" needs one

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionBody, self._completion_request, self._completion_shape(chat=False))

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatBody, self._chat_request, self._completion_shape(chat=True))

    async def responses(self, request: Request) -> Response:
        return await self._serve(request, ResponsesBody, self._responses_request, self._responses_shape)

    async def stored_response(self, request: Request, response_id: str) -> Response:
        """GET: the response as it was returned, or as a background one stands; with stream=true, a background
        response's events from after the sequence number starting_after on, as they come. DELETE: forget it, as
        OpenAI answers a deletion."""
        try:
            self._authorize(request)
            if request.method == "DELETE":
                if self.store is None or not await self.store.delete(response_id):
                    raise _no_stored_response(response_id, "response_id")
                return JSONResponse({"id": response_id, "object": "response", "deleted": True})
            stored = await self._stored(response_id, "response_id")
            if request.query_params.get("stream", "false").lower() != "true":
                return JSONResponse(stored.response)
            if not stored.events:
                raise invalid("stream", "only a background response created with stream: true can be streamed "
                                        "again; GET it without stream")
            after = request.query_params.get("starting_after", "-1")
            if not (after == "-1" or after.isascii() and after.isdigit()):
                raise invalid("starting_after", f"must be an event's sequence number, got {after!r}")
            return EventStream(self.store.events(response_id, int(after)))
        except Exception as e:
            return error_response(classify(e))

    async def list_input_items(self, request: Request, response_id: str) -> Response:
        """OpenAI's list of a stored response's input items, a page at a time: newest first unless order=asc,
        `limit` of them (20 unless asked, at most 100), after the item `after` names."""
        try:
            self._authorize(request)
            stored = await self._stored(response_id, "response_id")
            items = input_items(response_id, stored.conversation[:-1])  # the reply, last, is the output
            return JSONResponse(_page(items, request.query_params))
        except Exception as e:
            return error_response(classify(e))

    async def cancel_response(self, request: Request, response_id: str) -> Response:
        """Cancels a background response, whichever replica runs it: it is stored as cancelled at once, and its
        request stops within a beat (router/background.py). Cancelling one that has ended returns it as it ended,
        as OpenAI does, so a second cancellation is harmless. Other responses cannot be cancelled: a client stops
        one in flight by closing its stream or connection."""
        try:
            self._authorize(request)
            stored = await self._stored(response_id, "response_id")
            if not stored.response.get("background"):
                raise invalid("response_id", "only a background response can be cancelled (to stop a response "
                                             "in flight, close its stream)")
            if stored.response["status"] in RUNNING:
                cancelled = await self.store.cancel(stored)
                if cancelled is not None:
                    return JSONResponse(cancelled)
                stored = await self._stored(response_id, "response_id")  # it ended meanwhile
            return JSONResponse(stored.response)
        except Exception as e:
            return error_response(classify(e))

    async def _stored(self, response_id: str, field: str) -> StoredResponse:
        stored = None if self.store is None else await self.store.load(response_id)
        if stored is None:
            raise _no_stored_response(response_id, field)
        return stored

    def _completion_shape(self, chat: bool) -> Callable[[GenerationBody, str, list[GenerateRequest],
                                                         ToolChoice | None], Shape]:
        def shape(body: GenerationBody, request_id: str, choices: list[GenerateRequest],
                  tools: ToolChoice | None) -> Shape:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            continuous_usage = include_usage and bool(body.stream_options.continuous_usage_stats)
            echoes = None
            if not chat and body.echo:
                echoes = [self._echo(c) for c in choices]
            return ResponseShape(self.ingress, request_id, chat, choices[0].params.logprobs,
                                 choices_per_prompt=body.n or 1, include_usage=include_usage,
                                 continuous_usage=continuous_usage, echoes=echoes,
                                 prompt_only=not chat and _scores_prompt_only(body),
                                 tool_choice=tools,
                                 reasoning=self.ingress.reasoning if chat else None,
                                 model=self.ingress.model_name(body.model))
        return shape

    def _echo(self, choice: GenerateRequest) -> str:
        """The prompt the model saw: as given, or the text of the tokens truncate_prompt_tokens kept."""
        if choice.prompt is not None and choice.params.truncate_prompt_tokens is None:
            return choice.prompt
        return self.ingress.detokenize(self.ingress.prompt_token_ids(choice), field="prompt")

    def _responses_shape(self, body: ResponsesBody, request_id: str, choices: list[GenerateRequest],
                         tools: ToolChoice | None) -> Shape:
        text_format = _text_format(body)
        echoed = {"background": bool(body.background), "truncation": body.truncation or "disabled",
                  "instructions": body.instructions, "metadata": body.metadata or {}, "user": body.user,
                  "tools": body.tools or [], "tool_choice": body.tool_choice or "none",
                  "parallel_tool_calls": body.parallel_tool_calls is not False,
                  "previous_response_id": body.previous_response_id, "model": self.ingress.model_name(body.model),
                  "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True)
                           if text_format is not None else {"type": "text"}}}
        messages = choices[0].messages
        conversation = messages[1:] if body.instructions is not None else messages  # instructions are not kept
        save = None
        if self.store is not None and body.store is not False:
            save = partial(self.store.advance, events=bool(body.stream)) if body.background else self.store.save
        return ResponsesShape(self.ingress, request_id, choices[0].params, echoed, save, conversation, tools,
                              self.ingress.reasoning)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self.ingress.model_names]})

    async def model(self, request: Request, model: str) -> Response:
        try:
            self._authorize(request)
            await self.ingress.resolve_model(model)
            self.ingress.check_model(model)
        except Exception as e:
            return error_response(classify(e))
        return JSONResponse(self._model_card(model))

    def _model_card(self, name: str) -> dict:
        """The served model's card, or a LoRA adapter's, whose parent is the served model (vLLM's cards)."""
        model = self.ingress.model
        parent = None if name == model.name else model.name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tandem", "root": name,
                "parent": parent, "max_model_len": model.max_model_len}

    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's endpoint, and its answer: plain text on success."""
        try:
            body = await self.read(request, LoadLoRABody)
            await self.ingress.load_lora_adapter(body.lora_name, body.lora_path, body.load_inplace)
        except Exception as e:
            return refused_response(e)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, request: Request) -> Response:
        try:
            body = await self.read(request, UnloadLoRABody)
            await self.ingress.unload_lora_adapter(body.lora_name)
        except Exception as e:
            return refused_response(e)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._tokenizer_request(request, TokenizeBody)
            if body.prompt is not None and body.messages is None and body.add_special_tokens is False:
                ids = self.ingress.tokenizer.encode(body.prompt, add_special_tokens=False)
            else:  # what /v1/completions or /v1/chat/completions would feed the model
                ids = self.ingress.prompt_token_ids(GenerateRequest(
                    prompt=body.prompt, messages=None if body.messages is None else _messages(body.messages),
                    add_generation_prompt=body.add_generation_prompt is not False,
                    continue_final_message=bool(body.continue_final_message),
                    chat_template_kwargs=body.chat_template_kwargs))
        except Exception as e:
            return refused_response(e)
        return JSONResponse({"count": len(ids), "max_model_len": self.ingress.model.max_model_len, "tokens": ids})

    async def input_tokens(self, request: Request) -> Response:
        try:
            body = await self._tokenizer_request(request, InputTokensBody)
            ids = self.ingress.prompt_token_ids(GenerateRequest(messages=await self._responses_messages(body),
                                                                tools=chat_tools(body.tools)))
        except Exception as e:
            return refused_response(e)
        return JSONResponse({"object": "response.input_tokens", "input_tokens": len(ids)})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._tokenizer_request(request, DetokenizeBody)
            return JSONResponse({"prompt": self.ingress.detokenize(body.tokens, field="tokens")})
        except Exception as e:
            return refused_response(e)

    async def _tokenizer_request(self, request: Request, body_type: type[Body]) -> Body:
        body = await self.read(request, body_type)
        if body.model:
            self.ingress.check_model(body.model)
        return body

    async def metrics(self) -> Response:
        return Response(await self.ingress.metrics.render(), media_type=CONTENT_TYPE)

    async def health(self) -> PlainTextResponse:
        if self.ingress.draining:
            return PlainTextResponse("draining", status_code=503)
        return PlainTextResponse("ok")

    async def version(self) -> JSONResponse:
        return JSONResponse({"version": package_version("tandem")})

    async def _serve(self, request: Request, body_type: type[Body],
                     build: Callable[[Body, dict[str, str]], Awaitable[Built]],
                     shape: Callable[[Body, str, list[GenerateRequest], ToolChoice | None], Shape]) -> Response:
        aliases: dict[str, str] = {}  # engine field -> the name this API calls it, for error messages
        try:
            body = await self.read(request, body_type)
            prompts, params, tools = await build(body, aliases)
            request_id = body.request_id or uuid.uuid4().hex
            choices = self._choices(body, request_id, prompts, params)
            shaped = shape(body, request_id, choices, tools)  # names the model, so an unknown one is refused here
            background = isinstance(body, ResponsesBody) and bool(body.background)
            if background:
                self.ingress.validate(choices[0])  # bad input is a 400 now, not a response that fails later
        except PayloadTooLarge as e:
            self.ingress.refused(ApiError(Kind.INVALID_ARGUMENT, str(e)))
            return refused_response(e)
        except Exception as e:
            error = renamed(classify(e), aliases)
            self.ingress.refused(error)
            return error_response(error)
        try:
            # Ingress.generate counts each choice
            if background:
                return await self._in_background(choices, shaped, bool(body.stream))
            return await self._generate(choices, shaped, bool(body.stream))
        except Exception as e:
            return error_response(renamed(classify(e), aliases))

    def _authorize(self, request: Request) -> None:
        key = self.ingress.api.key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(Kind.UNAUTHENTICATED, "a valid API key is required: send 'Authorization: Bearer <key>'")

    async def read(self, request: Request, body_type: type[Body]) -> Body:
        """A request's body, once its API key is checked: parsed, its size limited, and the LoRA adapter it names
        loaded if lora_dir holds it and it is not loaded yet."""
        self._authorize(request)
        return await self._parse(request, body_type)

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
            errors = e.errors(include_url=False)
            path = _field_path(errors[0]["loc"])
            message = _union_message(errors) or errors[0]["msg"]
            raise ApiError(Kind.INVALID_ARGUMENT, f"{path}: {message}" if path else message, path) from None
        if body.model_extra:
            logger.debug("ignoring unknown request fields %s", sorted(body.model_extra))
        await self.ingress.resolve_model(getattr(body, "model", None))
        return body

    async def _completion_request(self, body: CompletionBody, aliases: dict[str, str]) -> Built:
        if body.suffix:
            raise invalid("suffix", "suffixes are not supported")
        if body.best_of not in (None, 1):
            raise invalid("best_of", "only best_of=1 is supported")
        batch = body.prompt if isinstance(body.prompt, list) and body.prompt and \
            isinstance(body.prompt[0], (str, list)) else [body.prompt]
        prompts = []
        for prompt in batch:
            if isinstance(prompt, list) and not prompt:
                raise invalid("prompt", "must not be empty")
            prompts.append({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt})
        aliases["prompt_token_ids"] = "prompt"
        if _scores_prompt_only(body):
            max_tokens = 1  # the engine always generates a token; the response leaves it out
        elif body.max_tokens is not None:
            max_tokens = body.max_tokens
        else:
            max_tokens = self._default_max_tokens(COMPLETIONS_DEFAULT_MAX_TOKENS)
        params = self._params(body, max_tokens, body.logprobs,
                              requested_structure(body, "response_format", body.response_format, aliases))
        if body.echo and body.logprobs is not None:
            params = replace(params, prompt_logprobs=body.logprobs)
        aliases["prompt_logprobs"] = "logprobs"
        return prompts, params, None

    async def _chat_request(self, body: ChatBody, aliases: dict[str, str]) -> Built:
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        tools = self._tools(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        aliases.update(logprobs="top_logprobs", prompt="messages")  # the prompt is the rendered messages
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        structure = _structure_or_tools(requested_structure(body, "response_format", body.response_format, aliases),
                                        tools, aliases)
        params = _for_tools(self._params(body, max_tokens if max_tokens is not None else self._default_max_tokens(),
                                         logprobs, structure), tools)
        return [{"messages": _messages(body.messages), "tools": chat_tools(body.tools),
                 "add_generation_prompt": body.add_generation_prompt is not False,
                 "continue_final_message": bool(body.continue_final_message),
                 "chat_template_kwargs": body.chat_template_kwargs}], params, tools

    async def _responses_request(self, body: ResponsesBody, aliases: dict[str, str]) -> Built:
        if body.background and (body.store is False or self.store is None):
            raise invalid("background", "a background response is stored, to be polled: it needs store: true"
                          if self.store is not None else "background responses need the cluster's Redis store")
        if body.n not in (None, 1):
            raise invalid("n", "a response has one output; use /v1/chat/completions for n > 1")
        tools = self._tools(body)
        logprobs_wanted = body.top_logprobs is not None or "message.output_text.logprobs" in (body.include or [])
        aliases.update(max_tokens="max_output_tokens", logprobs="top_logprobs", prompt="input", messages="input")
        max_tokens = next((m for m in (body.max_output_tokens, body.max_tokens) if m is not None),
                          self._default_max_tokens())
        structure = _structure_or_tools(requested_structure(body, "text.format", _text_format(body), aliases),
                                        tools, aliases)
        params = _for_tools(self._params(body, max_tokens, (body.top_logprobs or 0) if logprobs_wanted else None,
                                         structure), tools)
        return [{"messages": await self._responses_messages(body), "tools": chat_tools(body.tools)}], params, tools

    async def _responses_messages(self, body: ResponsesBody | InputTokensBody) -> list[dict[str, Any]]:
        """A Responses API request's prompt as chat messages: its instructions, the stored conversation it
        continues, then its input."""
        instructions = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
        earlier = []
        if body.previous_response_id:
            previous = await self._stored(body.previous_response_id, "previous_response_id")
            status = previous.response.get("status")
            if status in RUNNING:
                raise invalid("previous_response_id", f"response {body.previous_response_id!r} is still {status}: "
                                                      "continue it once it ends")
            if status in ("failed", "cancelled"):
                raise invalid("previous_response_id", f"response {body.previous_response_id!r} was {status}: it "
                                                      "has no reply to continue from")
            earlier = previous.conversation
        given = [] if body.input is None else _input_messages(body.input)
        if not earlier and not given:
            raise invalid("input", "give the input, or previous_response_id to count the conversation it continues")
        if body.truncation == "auto":
            return instructions + self._latest_turns_that_fit(instructions, earlier + given, chat_tools(body.tools))
        return instructions + earlier + given

    def _latest_turns_that_fit(self, instructions: list[dict[str, Any]], messages: list[dict[str, Any]],
                               tools: list[dict] | None) -> list[dict[str, Any]]:
        """truncation: auto, as OpenAI has it: the conversation's oldest turns dropped, until the prompt leaves
        room for a reply. A turn is dropped whole (a user message and all that answered it), so no reply or tool
        output is left without what it answers; the instructions stay. Where even the last turn does not fit, it
        is kept, and refused as too long as it would be without truncation."""
        starts = [0] + [i for i, message in enumerate(messages) if i and message["role"] == "user"]
        room = self.ingress.model.max_model_len - 1

        def fits(start: int) -> bool:
            prompt = GenerateRequest(messages=instructions + messages[start:], tools=tools)
            return len(self.ingress.prompt_token_ids(prompt)) <= room

        first = bisect_left(range(len(starts)), True, key=lambda i: fits(starts[i]))  # fewer turns, fewer tokens
        return messages[starts[min(first, len(starts) - 1)]:]

    def _tools(self, body: ChatBody | ResponsesBody) -> ToolChoice | None:
        return tool_choice(body.tools, body.tool_choice, body.parallel_tool_calls is not False, self.tool_parser)

    def _default_max_tokens(self, api_default: int | None = None) -> int:
        """A request's max_tokens when it gives none: the API's own default (16 for completions, else the
        context), at most the model's recommended max_new_tokens and the server's cap."""
        model_len = self.ingress.model.max_model_len
        cap = min(self.ingress.api.max_tokens or model_len, model_len)
        recommended = self.ingress.model.sampling_defaults.get("max_tokens")
        return min(v for v in (api_default, recommended, cap) if v is not None)

    def _params(self, body: GenerationBody, max_tokens: int, logprobs: int | None,
                structured_output: StructuredOutput | None) -> SamplingParams:
        """The request's fields, and the model's recommended sampling (ServedModel.sampling_defaults) for those
        it leaves unset."""
        given = {name: value for name, value in self.ingress.model.sampling_defaults.items() if name != "max_tokens"}
        given.update({name: getattr(body, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "min_tokens", "allowed_token_ids", "bad_words",
            "truncate_prompt_tokens", "priority") if getattr(body, name) is not None})
        if body.logit_bias:
            given["logit_bias"] = _token_biases(body.logit_bias)
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=bool(body.ignore_eos),
                              include_stop_str_in_output=bool(body.include_stop_str_in_output),
                              skip_special_tokens=body.skip_special_tokens is not False,
                              structured_output=structured_output, **given)

    def _choices(self, body: GenerationBody, request_id: str, prompts: list[dict],
                 params: SamplingParams) -> list[GenerateRequest]:
        """One cluster request per choice, n for each prompt in order; choice i of a seeded request is seeded
        seed + i, so the n choices differ and each is reproducible."""
        n = 1 if body.n is None else body.n
        if n < 1:
            raise invalid("n", f"must be a positive integer, got {n}")
        limit = self.ingress.api.max_choices
        if n * len(prompts) > limit:
            raise invalid("n" if len(prompts) == 1 else "prompt",
                          f"at most {limit} choices per request (n times the prompts), got {n * len(prompts)}")
        choices = []
        for prompt in prompts:
            for i in range(n):
                seeded = params if params.seed is None else replace(params, seed=(params.seed + i) % 2**64)
                choices.append(GenerateRequest(
                    **prompt, params=seeded, cache_salt=body.cache_salt, model=body.model,
                    request_id=request_id if n * len(prompts) == 1 else f"{request_id}-{len(choices)}"))
        return choices

    async def _generate(self, choices: list[GenerateRequest], shape: Shape, stream: bool) -> Response:
        streams = [self.ingress.generate(choice) for choice in choices]
        # Bad input, an unknown model, a full cluster: all raise here, before a byte of the response is sent.
        firsts = await first_of_each(streams)
        if stream:
            return EventStream(shape.events(firsts, streams), close=lambda: close_all(streams))
        return JSONResponse(await shape.response(await lasts(firsts, streams)))

    async def _in_background(self, choices: list[GenerateRequest], shape: ResponsesShape, stream: bool) -> Response:
        """The response queued, or with `stream`, its events as its run makes them: a client that hangs up leaves
        it running, and can stream it again from where it left off."""
        queued = await self.background.start(choices[0], shape, events=stream)
        if stream:
            return EventStream(self.store.events(queued["id"], after=-1))
        return JSONResponse(queued)


def _token_biases(logit_bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    try:
        return {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise invalid("logit_bias", "keys must be token ids, e.g. {\"50256\": -100}") from None


def _scores_prompt_only(body: CompletionBody) -> bool:
    """echo with max_tokens 0: the prompt (and its logprobs) alone, as scoring clients ask for it."""
    return bool(body.echo) and body.max_tokens == 0


def _page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of a list, as OpenAI's cursor pagination has it: `has_more` says whether to ask again with the
    page's last id as `after`."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", f"must be asc or desc, got {order!r}")
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise invalid("limit", f"must be an integer from 1 to 100, got {limit!r}")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if "after" in query:
        ids = [item["id"] for item in ordered]
        if query["after"] not in ids:
            raise invalid("after", f"no item {query['after']!r} in this list")
        start = ids.index(query["after"]) + 1
    data = ordered[start:start + int(limit)]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + len(data) < len(ordered)}


def _no_stored_response(response_id: str, field: str) -> ApiError:
    return ApiError(Kind.NOT_FOUND, f"{field}: no stored response {response_id!r} (it was stored with store: "
                                    f"false, deleted, or has expired)", field)


def _structure_or_tools(structure: StructuredOutput | None, tools: ToolChoice | None,
                        aliases: dict[str, str]) -> StructuredOutput | None:
    """What holds the output: the format asked for, or a forced tool call's schema (never both)."""
    if tools is None or tools.structure is None:
        return structure
    if structure is not None:
        raise invalid(aliases["structured_output"], "a tool call's arguments follow its tool's schema: ask for a "
                                                    "tool call or a format, not both")
    aliases["structured_output"] = "tools"
    return tools.structure


def _for_tools(params: SamplingParams, tools: ToolChoice | None) -> SamplingParams:
    """A parser reads the format's markers, which some tokenizers count as special tokens: keep them in the text."""
    return replace(params, skip_special_tokens=False) if tools is not None and tools.parser is not None else params


def _text_format(body: ResponsesBody) -> ResponseFormat | None:
    return body.text.format if body.text is not None else None


_INPUT_ROLES = {"user", "assistant", "system", "developer"}
_INPUT_TEXT_PARTS = {"input_text", "output_text", "text"}


def _input_messages(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """A Responses API input as role/content pairs: text is one user message; message items keep their roles
    (developer as system), their text parts joined; a function call is an assistant's tool call, its output a
    tool message, as chat templates take them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise invalid("input", "must not be empty")
    rendered = []
    for i, item in enumerate(items):
        if item.type in ("function_call", "function_call_output"):
            rendered.append(_function_item(item, f"input[{i}]"))
            continue
        if item.type != "message":
            raise invalid(f"input[{i}].type", f"only message, function_call and function_call_output items are "
                                              f"supported, got {item.type!r}")
        if item.role not in _INPUT_ROLES:
            raise invalid(f"input[{i}].role", f"must be user, assistant, system or developer, got {item.role!r}")
        content = item.content
        if isinstance(content, list):
            if any(part.type not in _INPUT_TEXT_PARTS or part.text is None for part in content):
                raise invalid(f"input[{i}].content", "only text content parts are supported")
            content = "\n".join(part.text for part in content)
        rendered.append({"role": "system" if item.role == "developer" else item.role, "content": content or ""})
    return rendered


def _function_item(item: InputItem, where: str) -> dict[str, Any]:
    if item.call_id is None:
        raise invalid(f"{where}.call_id", f"a {item.type} item needs its call_id")
    if item.type == "function_call_output":
        return {"role": "tool", "tool_call_id": item.call_id, "content": item.output or ""}
    if item.name is None:
        raise invalid(f"{where}.name", "a function_call item needs the function's name")
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments or ""}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Role/content pairs for the chat template: text parts joined, OpenAI's 'developer' role as 'system'; an
    assistant's tool calls and a tool message's call id kept for templates that render them."""
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise invalid(f"messages[{i}].content", "only text content parts are supported")
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or ""})
        if message.tool_calls:
            rendered[-1]["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            rendered[-1]["tool_call_id"] = message.tool_call_id
    return rendered


_NESTED_FIELDS = {"role", "content", "type", "text", "include_usage", "continuous_usage_stats"}


def _field_path(loc: tuple) -> str | None:
    """A validation error's location as a field path: ('messages', 0, 'content') -> messages[0].content; the
    type tags pydantic adds for unions ('list[int]') are dropped."""
    if not loc:
        return None
    path = str(loc[0])
    for part in loc[1:_path_length(loc)]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _path_length(loc: tuple) -> int:
    """How many of a location's parts name the field, before any union's type tag."""
    for length, part in enumerate(loc[1:], 1):
        if not isinstance(part, int) and part not in _NESTED_FIELDS:
            return length
    return len(loc)


def _union_message(errors: list[dict]) -> str | None:
    """For a field that may take several forms (a prompt: a string, strings, token ids or lists of them), what
    those are, rather than why the first form failed ("Input should be a valid string"); None for another field."""
    loc = errors[0]["loc"]
    at = _path_length(loc)
    if not loc or at == len(loc):
        return None
    forms = list(dict.fromkeys(e["loc"][at] for e in errors if len(e["loc"]) > at and e["loc"][:at] == loc[:at]))
    return f"must be one of {', '.join(forms)}" if len(forms) > 1 else None
