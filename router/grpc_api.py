"""The gRPC API (proto/tandem/v1/tandem.proto) on a grpc.aio server inside each ingress replica.

Why not Serve's gRPC proxy: it serves neither the standard grpc.health.v1 service nor plain server reflection
(grpcurl), has no TLS or per-call authentication, and reports a deployment's exception as one status code. Our own
server on the replica's event loop calls the ingress directly, so a cancelled or expired call cancels the request
on the spot (freeing its KV blocks), and every error gets its documented status (router/errors.py). Several
ingress replicas on one node share the port: gRPC binds it with SO_REUSEPORT and the kernel spreads connections.

A request's path here: decode the message (undecodable bytes, e.g. invalid UTF-8, are INVALID_ARGUMENT, not
INTERNAL) -> refuse unknown fields -> check the API key -> build the engine's request -> stream the ingress's
outputs as GenerateResponse deltas (a chat reply's thinking apart from its answer, with a reasoning parser; its
tool calls on the last response, with tools).
"""

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from proto.tandem.v1 import tandem_pb2 as pb
from router.api_config import ApiConfig
from router.errors import ApiError, Kind, classify, invalid, renamed
from router.ingress import EmbedRequest, GenerateRequest, Ingress
from router.openai_tools import ToolChoice, tool_choice
from router.reasoning import ReasoningParser, ReasoningSplit
from router.tool_call_json import CallDelta, CallStream
from router.tool_parsers import tool_call_parser
from workers.engine.classification import classified
from workers.engine.errors import InvalidRequestError
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams, StructuredOutput, recommended_fields
from workers.engine.structured_output import check_structured_output

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# Open to every caller, with or without an API key: probes and tooling.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The engine's name for a field -> tandem.v1's, so an error names the field the caller set.
_FIELD_NAMES = {"prompt_token_ids": "token_ids"}


class Undecodable:
    """Stands in for a request message whose bytes do not parse, so the handler can say INVALID_ARGUMENT."""

    def __init__(self, message_type: type[Message], error: Exception):
        self.reason = f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {error}"


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(message_type, e)
    return parse


Built = tuple[GenerateRequest, ToolChoice | None]


def _unary(answer: Callable[[Any, Message], Awaitable[Message]]):
    """A unary RPC: undecodable input, unknown fields and an unknown model are refused first, and any failure is
    answered with its documented status."""
    @functools.wraps(answer)
    async def call(servicer: "GenerationServicer", request: Message, context: grpc.aio.ServicerContext) -> Message:
        try:
            await servicer._check(request)
            return await answer(servicer, request)
        except Exception as e:
            await _abort(context, e)

    return call


class GenerationServicer:
    def __init__(self, ingress: Ingress):
        self.ingress = ingress
        self.tool_parser = tool_call_parser(ingress.api.tool_call_parser)  # tool_choice "auto" needs one

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        async for response in self._stream(request, context, self._generate_request):
            yield response

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.GenerateResponse]:
        async for response in self._stream(request, context, self._chat_request, chat=True):
            yield response

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        out = await self._last_token(request, context)
        return pb.EmbedResponse(embedding=out.embedding, usage=_prompt_usage(out))

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        out = await self._last_token(request, context)
        classes = self.ingress.model.classes
        result = classified(out.embedding, classes)
        return pb.ClassifyResponse(label=result.label, probs=result.probs, labels=classes.labels,
                                   usage=_prompt_usage(out))

    async def _last_token(self, request: pb.EmbedRequest | pb.ClassifyRequest,
                          context: grpc.aio.ServicerContext) -> RequestOutput:
        """Embed's and Classify's request through the ingress, which counts it; one refused before it gets there
        (undecodable, an unknown field or model, no prompt) is counted too, as _stream counts a stream's."""
        taken = False
        try:
            await self._check(request)
            last_token_request = _last_token_request(request)
            taken = True
            return await self.ingress.embed(last_token_request)
        except Exception as e:
            if not taken:
                self.ingress.refused(classify(e), getattr(request, "request_id", "") or None)
            await _abort(context, e)

    @_unary
    async def Tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=self.ingress.tokenizer.encode(request.text, add_special_tokens=False))

    @_unary
    async def Detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        text = self.ingress.detokenize(list(request.token_ids), skip_special_tokens=request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    @_unary
    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        model = self.ingress.model
        base = pb.Model(id=model.name, max_model_len=model.max_model_len, block_size=model.block_size)
        adapters = [pb.Model(id=name, max_model_len=model.max_model_len, block_size=model.block_size,
                             parent=model.name) for name in self.ingress.lora.names]
        return pb.ListModelsResponse(models=[base, *adapters])

    @_unary
    async def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest) -> pb.LoadLoRAAdapterResponse:
        await self.ingress.load_lora_adapter(request.lora_name, request.lora_path, request.load_inplace)
        return pb.LoadLoRAAdapterResponse()

    @_unary
    async def UnloadLoRAAdapter(self, request: pb.UnloadLoRAAdapterRequest) -> pb.UnloadLoRAAdapterResponse:
        await self.ingress.unload_lora_adapter(request.lora_name)
        return pb.UnloadLoRAAdapterResponse()

    async def _stream(self, request, context: grpc.aio.ServicerContext, build: Callable[[Message], Built],
                      chat: bool = False) -> AsyncIterator[pb.GenerateResponse]:
        """`chat`: a reply whose thinking a reasoning parser tells from its answer, and which may call tools."""
        outputs = None
        try:
            await self._check(request)
            generate_request, tools = build(request)
            reply = _ChatReply(self.ingress.reasoning, tools) if chat else None
            outputs = self.ingress.generate(generate_request)
            first = True
            async for out in outputs:
                response = _response(out, first)
                if reply is not None:
                    reply.fill(response, out)
                yield response
                first = False
        except asyncio.CancelledError:
            # The client cancelled, disconnected or its deadline passed: gRPC has already told it so; closing
            # the stream (finally, below) cancels the request in the cluster.
            logger.info("gRPC call %s ended by the client (%s)", getattr(request, "request_id", ""),
                        "deadline" if context.time_remaining() is not None and context.time_remaining() <= 0
                        else "cancelled")
            raise
        except Exception as e:
            if outputs is None:  # refused before reaching the ingress, which counts the rest
                self.ingress.refused(classify(e), getattr(request, "request_id", "") or None)
            await _abort(context, e)
        finally:
            if outputs is not None:
                await outputs.aclose()

    async def _check(self, request) -> None:
        """Undecodable or unknown input is refused before anything runs."""
        if isinstance(request, Undecodable):
            raise ApiError(Kind.INVALID_ARGUMENT, request.reason)
        unknown = _unknown_field(request)
        if unknown:
            raise invalid(unknown, "unknown field (not in tandem.v1): this server does not know what it means")
        model = getattr(request, "model", "")
        if model:
            await self.ingress.resolve_model(model)
            self.ingress.check_model(model)

    def _generate_request(self, request: pb.GenerateRequest) -> Built:
        which = request.WhichOneof("prompt")
        if which is None:
            raise invalid("prompt", "give text or token_ids")
        return GenerateRequest(prompt=request.text if which == "text" else None,
                               prompt_token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
                               params=_sampling(request.sampling, self.ingress.model.sampling_defaults),
                               request_id=request.request_id or None,
                               cache_salt=request.cache_salt or None, model=request.model or None), None

    def _chat_request(self, request: pb.ChatRequest) -> Built:
        tools = [_tool(i, t) for i, t in enumerate(request.tools)] or None
        which = request.tool_choice.WhichOneof("choice")
        choice = None if which is None else request.tool_choice.mode if which == "mode" else \
            {"type": "function", "function": {"name": request.tool_choice.function}}
        parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
        calls = tool_choice(tools, choice, parallel, self.tool_parser)
        params = _sampling(request.sampling, self.ingress.model.sampling_defaults)
        return GenerateRequest(messages=[_chat_message(m) for m in request.messages],
                               params=params if calls is None else _held_to(params, calls), tools=tools,
                               request_id=request.request_id or None, cache_salt=request.cache_salt or None,
                               model=request.model or None, add_generation_prompt=not request.continue_final_message,
                               continue_final_message=request.continue_final_message,
                               chat_template_kwargs=MessageToDict(request.chat_template_kwargs)
                               if request.HasField("chat_template_kwargs") else None), calls


class _ChatReply:
    """What a chat reply's responses carry besides its tokens: with a reasoning parser, its thinking apart from its
    answer; with tools, the answer's text up to where a call may begin, the calls' deltas as they are generated,
    and the calls whole at the end. A reply whose calls began but do not parse in the end (cut off by max_tokens)
    ends there, as what was sent cannot be taken back."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolChoice | None):
        self.reasoning = reasoning
        self.tools = tools
        self.split: ReasoningSplit | None = None
        self.sent = 0  # with tools: how much of the answer has gone out
        self.calls = tools.call_stream() if tools is not None else CallStream()

    def fill(self, response: pb.GenerateResponse, out: RequestOutput) -> None:
        completion = out.outputs[0]
        answer = completion.text
        if self.reasoning is not None:
            if self.split is None:
                self.split = self.reasoning.split(out.prompt_token_ids)
            parts, response.reasoning_text, response.text = self.split.news(completion.text, out.finished)
            answer = parts.content
        if self.tools is not None:
            self._release(response, answer, completion.finish_reason if out.finished else None)

    def _release(self, response: pb.GenerateResponse, answer: str, finish_reason: str | None) -> None:
        if finish_reason is None:
            upto = max(self.sent, self.tools.text_so_far(answer))
            response.text, self.sent = answer[self.sent:upto], upto
            self._deltas(response, self.calls.deltas(self.tools.calls_so_far(answer)))
            return
        content, calls = self.tools.reply(answer, finish_reason == "stop")
        if calls is None:
            response.text = "" if self.calls.ids else (content or "")[self.sent:]
            return
        response.text = (content or "")[self.sent:]
        self._deltas(response, self.calls.finish(calls))
        response.finish_reason = "tool_calls"
        response.tool_calls.extend(pb.ToolCall(id=call["id"], name=call["function"]["name"],
                                               arguments=call["function"]["arguments"])
                                   for call in self.calls.with_ids(calls))

    @staticmethod
    def _deltas(response: pb.GenerateResponse, deltas: list[CallDelta]) -> None:
        response.tool_call_deltas.extend(pb.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "",
                                                          arguments=d.arguments) for d in deltas)


def _tool(index: int, tool: pb.Tool) -> dict[str, Any]:
    """A tool in OpenAI chat's layout, which tool_choice and chat templates take."""
    if not tool.name:
        raise invalid(f"tools[{index}].name", "must not be empty")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.HasField("parameters"):
        function["parameters"] = _json(MessageToDict(tool.parameters))
    return {"type": "function", "function": function}


def _json(value: Any) -> Any:
    """A Struct's value as the JSON it stands for: protobuf keeps every number as a double, so a schema's
    {"maxItems": 1} would come back as 1.0."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _chat_message(message: pb.ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": call.arguments}} for call in message.tool_calls]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _held_to(params: SamplingParams, calls: ToolChoice) -> SamplingParams:
    """A forced call is the tool's schema as a structured output, so the caller's cannot come with it; "auto"'s
    parser reads the format's markers, which some tokenizers count as special tokens: they stay in the text."""
    if calls.structure is None:
        return replace(params, skip_special_tokens=False)
    if params.structured_output is not None:
        raise invalid("tool_choice", "a forced tool call's arguments follow its tool's schema: ask for a tool "
                                     "call or a structured_output, not both")
    held = replace(params, structured_output=calls.structure)
    try:
        check_structured_output(held)  # here, so that a refusal names the tools, as the caller sent no structure
    except InvalidRequestError as e:
        raise invalid("tools", e.message) from None
    return held


def _last_token_request(request: pb.EmbedRequest | pb.ClassifyRequest) -> EmbedRequest:
    """The ingress's request for what the model makes of the prompt's last token: an embedding, or with a
    ClassifyRequest, a classifier's logits."""
    which = request.WhichOneof("prompt")
    if which is None:
        raise invalid("prompt", "give text or token_ids")
    truncate = request.truncate_prompt_tokens if request.HasField("truncate_prompt_tokens") else None
    classifying = isinstance(request, pb.ClassifyRequest)
    return EmbedRequest(prompt=request.text if which == "text" else None,
                        prompt_token_ids=list(request.token_ids.ids) if which == "token_ids" else None,
                        truncate_prompt_tokens=truncate,
                        dimensions=None if classifying else request.dimensions or None,
                        request_id=request.request_id or None, cache_salt=request.cache_salt or None,
                        model=request.model or None, classify=classifying)


def _prompt_usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.usage.prompt_tokens, cached_tokens=out.usage.cached_tokens)


def _sampling(s: pb.SamplingParams, recommended: dict[str, Any]) -> SamplingParams:
    """The engine's params from the message: an unset optional field takes the model's recommended value
    (ServedModel.sampling_defaults; max_tokens at most it), else the engine's default."""
    given = recommended_fields(recommended)
    given.update({name: getattr(s, name) for name in (
        "max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "min_tokens", "min_p", "prompt_logprobs", "skip_special_tokens",
        "truncate_prompt_tokens") if s.HasField(name)})
    return SamplingParams(**given, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          allowed_token_ids=tuple(s.allowed_token_ids), bad_words=tuple(s.bad_words),
                          ignore_eos=s.ignore_eos, include_stop_str_in_output=s.include_stop_str_in_output,
                          logit_bias=dict(s.logit_bias), priority=s.priority,
                          structured_output=_structured(s.structured_output) if s.HasField("structured_output")
                          else None)


def _structured(s: pb.StructuredOutput) -> StructuredOutput:
    """An empty message is refused by StructuredOutput, which names the kinds to choose from."""
    kind = s.WhichOneof("kind")
    given = {} if kind is None else {kind: tuple(s.choice.choices) if kind == "choice" else getattr(s, kind)}
    return StructuredOutput(**given)


def _unknown_field(message: Message, path: str = "") -> str | None:
    """The dotted path of a field this server's tandem.v1 does not define, if the message carries one."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"{path}#{unknown[0].field_number}"
    for field, value in message.ListFields():
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            repeated = field.is_repeated
            for i, item in enumerate(value if repeated else [value]):
                found = _unknown_field(item, f"{path}{field.name}{f'[{i}]' if repeated else ''}.")
                if found:
                    return found
    return None


def _response(out: RequestOutput, first: bool) -> pb.GenerateResponse:
    completion = out.outputs[0]
    response = pb.GenerateResponse(request_id=out.request_id, token_ids=completion.delta_token_ids,
                                   text=completion.delta_text)
    if first and out.prompt_logprobs is not None:
        for entry in out.prompt_logprobs[1:]:
            response.prompt_logprobs.add(logprobs=entry)
    if completion.logprobs is not None and completion.delta_token_ids:
        for entry in completion.logprobs[-len(completion.delta_token_ids):]:
            response.logprobs.add(logprobs=entry)
    if out.finished:
        response.finish_reason = completion.finish_reason or ""
        if isinstance(completion.stop_reason, str):
            response.stop_string = completion.stop_reason
        elif isinstance(completion.stop_reason, int):
            response.stop_token_id = completion.stop_reason
        usage = out.usage
        response.usage.CopyFrom(pb.Usage(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                                         completion_tokens=usage.generated_tokens))
    if out.ttft is not None:
        response.ttft.CopyFrom(pb.TimeToFirstToken(**vars(out.ttft)))
    return response


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    api_error = renamed(classify(error), _FIELD_NAMES)
    if api_error.kind is Kind.INTERNAL:
        logger.exception("gRPC call failed", exc_info=error)
    await context.abort(api_error.kind.grpc_code, api_error.message)


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health and reflection needs metadata 'authorization: Bearer <key>'."""

    def __init__(self, key: str):
        self._expected = f"Bearer {key}"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if sent == self._expected:
            return handler
        message = "missing API key: send metadata 'authorization: Bearer <key>'" if sent is None \
            else "wrong API key"

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as a server-streaming handler must be

        kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming \
            else grpc.unary_unary_rpc_method_handler
        return kind(refuse_stream if handler.response_streaming else refuse,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _generic_handler(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    methods = pb.DESCRIPTOR.services_by_name["Generation"].methods_by_name
    handlers = {}
    for name, method in methods.items():
        request_type = getattr(pb, method.input_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=_lenient(request_type),
                              response_serializer=lambda message: message.SerializeToString())
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class GrpcServer:
    """The running server, with the health service it flips when the replica drains."""

    def __init__(self, server: grpc.aio.Server, health: health_aio.HealthServicer, port: int):
        self.server = server
        self.health = health
        self.port = port
        self.draining = False

    def check_health(self) -> None:
        if self.draining:
            raise RuntimeError("the gRPC server is draining")

    async def drain(self, grace_s: float = 20.0) -> None:
        """Health turns NOT_SERVING, new calls get UNAVAILABLE, running calls get `grace_s` to finish."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc_server(ingress: Ingress, host: str, port: int) -> GrpcServer:
    api: ApiConfig = ingress.api
    options = [("grpc.max_receive_message_length", api.max_request_bytes), ("grpc.so_reuseport", 1)]
    interceptors = [_ApiKeyInterceptor(api.key)] if api.key else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers((_generic_handler(GenerationServicer(ingress)),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    _enable_reflection(server)
    address = f"{host}:{port}"
    if api.tls_cert_file:
        bound = server.add_secure_port(address, _credentials(api))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    await server.start()
    for service in ("", SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info("gRPC API on %s (%s%s)", address, "TLS" if api.tls_cert_file else "plaintext",
                ", API key required" if api.key else "")
    return GrpcServer(server, health, bound)


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1alpha (what grpcio-reflection implements) and as
    grpc.reflection.v1, which newer clients ask for first. The two define the same messages field for field, so
    the v1alpha servicer answers v1 calls on the wire, and lists and describes both."""
    _register_reflection_v1()
    servicer = reflection.aio.ReflectionServicer(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
         REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def _register_reflection_v1() -> None:
    """grpc/reflection/v1/reflection.proto in the default descriptor pool, which reflection answers from: the
    v1alpha file under v1's package, since grpcio-reflection ships no v1 module."""
    pool, name = descriptor_pool.Default(), "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old_package, file.name, file.package = file.package, name, "grpc.reflection.v1"
    file.options.Clear()
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    def renamed(type_name: str) -> str:
        return type_name.replace(f".{old_package}.", f".{file.package}.")

    for message in file.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = renamed(field.type_name)
    for method in file.service[0].method:
        method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    pool.AddSerializedFile(file.SerializeToString())


def _credentials(api: ApiConfig) -> grpc.ServerCredentials:
    """The files are read here, where the server runs (in a pod, the mounted secret), not where the config was
    written."""
    def read(name: str) -> bytes:
        path = getattr(api, name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise RuntimeError(f"api.{name}: cannot read {path!r}: {e.strerror}") from None

    client_ca = read("tls_client_ca_file") if api.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(read("tls_key_file"), read("tls_cert_file"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)
