"""A typed Python client for Tandem's gRPC API (proto/tandem/v1/tandem.proto), sync and asyncio.

    with TandemClient("localhost:50051") as client:
        print(client.generate("Once upon a time", max_tokens=32).text)
        vector = client.embed("A document to search for").embedding
        for chunk in client.chat_stream([("user", "Name three rivers.")], temperature=0):
            print(chunk.text, end="", flush=True)

    async with AsyncTandemClient("localhost:50051", api_key="...") as client:
        async for chunk in client.stream("Once upon a time"):
            ...

Results are plain dataclasses, not protobuf messages, and a failed call raises TandemError carrying the
server's status code and message. Sampling options left out (or None) are not sent, so the server's defaults
apply. Leaving a stream early (break, close(), or dropping it) cancels the call, and the server then aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11; only type checkers read it here

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc

Metadata = Sequence[tuple[str, str]]
Pem = str | Path | bytes  # a PEM file's path or its contents
Messages = Sequence[dict[str, Any] | tuple[str, str]]
R = TypeVar("R", pb.EmbedRequest, pb.ClassifyRequest)


class TandemError(Exception):
    """A call that failed: `code` is the gRPC status (INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...), `details` the
    server's message, which names the offending field for bad input."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # after the chat template, for chat
    cached_tokens: int  # prompt tokens whose KV came from a prefix cache
    completion_tokens: int


@dataclass(frozen=True)
class TimeToFirstToken:
    """Where the time to the first token went, in seconds, as the server saw it (stages not taken are 0)."""

    total_s: float
    router_queue_s: float
    prefill_queue_s: float
    prefill_compute_s: float
    kv_transfer_s: float
    kv_transfer_bytes: int
    first_decode_step_s: float


@dataclass(frozen=True)
class ToolCall:
    """A function call the reply makes. To carry the conversation on, put it in the assistant message's
    "tool_calls" and answer it with {"role": "tool", "content": result, "tool_call_id": its id}."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ToolCallDelta:
    """What a chunk adds to one of the reply's calls: the first of a call has its id and name, the next ones what
    is new of its arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class Chunk:
    """One streamed update: what was generated since the previous chunk. The last has finish_reason and usage;
    the first carrying a token has ttft."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # one entry per token id, when asked for
    finish_reason: str | None = None  # "stop", "length", "tool_calls" or "abort" on the last chunk
    stop_reason: str | int | None = None  # the stop string or stop token id that ended generation
    usage: Usage | None = None
    ttft: TimeToFirstToken | None = None
    prompt_logprobs: list[dict[int, float]] | None = None  # first chunk: prompt tokens 1.., when asked for
    reasoning_text: str = ""  # chat with a server reasoning parser: thinking; `text` is then the answer
    tool_calls: list[ToolCall] | None = None  # chat with tools, on the last chunk: the calls the reply makes
    tool_call_deltas: list[ToolCallDelta] | None = None  # chat with tools: the calls as they are generated


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    ttft: TimeToFirstToken | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None
    reasoning_text: str = ""
    tool_calls: list[ToolCall] | None = None

    def add(self, chunk: Chunk) -> Completion:
        self.request_id = self.request_id or chunk.request_id
        self.text += chunk.text
        self.reasoning_text += chunk.reasoning_text
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        self.ttft = self.ttft or chunk.ttft
        self.prompt_logprobs = self.prompt_logprobs or chunk.prompt_logprobs
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.usage = chunk.finish_reason, chunk.stop_reason, chunk.usage
            self.tool_calls = chunk.tool_calls
        return self


@dataclass(frozen=True)
class Embedding:
    embedding: list[float]  # unit length
    usage: Usage  # the prompt's tokens (completion_tokens 0)


@dataclass(frozen=True)
class Classification:
    label: str  # the likeliest class's name
    probs: list[float]  # per class, in the order of labels (one class, a reward score: its sigmoid)
    labels: list[str]  # the classes' names
    usage: Usage  # the prompt's tokens (completion_tokens 0)


@dataclass(frozen=True)
class Model:
    id: str  # the name requests pass as `model`
    max_model_len: int  # longest prompt plus completion, in tokens
    block_size: int  # tokens per KV block
    parent: str | None = None  # for a LoRA adapter, the model it runs on


class Options(TypedDict, total=False):
    """Keyword options of generate, stream, chat and chat_stream; None or left out: the server's default."""

    max_tokens: int | None
    temperature: float | None  # 0 is greedy
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str] | str
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int | None  # top-N log-probabilities per generated token
    include_stop_str_in_output: bool
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    logit_bias: Mapping[int, float]  # {token id: bias}
    min_tokens: int | None  # generated before EOS, stop tokens or stop strings may end it
    min_p: float | None  # drop tokens less likely than min_p x the likeliest
    prompt_logprobs: int | None  # top-N log-probabilities per prompt token after the first
    skip_special_tokens: bool | None  # leave special tokens out of the text (the server's default: true)
    # What the output must match, one of: {"json": a JSON schema (a dict or JSON text)}, {"json_object": True},
    # {"regex": ...}, {"choice": [strings]}, {"grammar": EBNF whose rule root is the output}
    structured_output: Mapping[str, Any] | None
    allowed_token_ids: Sequence[int]  # only these may be generated
    bad_words: Sequence[str]  # never generated
    truncate_prompt_tokens: int | None  # keep the prompt's last k tokens (-1: as many as the context allows)
    priority: int | None  # with the server's scheduling_policy "priority": lower runs first
    cache_salt: str | None  # requests with different salts never share cached KV
    continue_final_message: bool  # chat: the reply continues the last message instead of opening a turn
    chat_template_kwargs: Mapping[str, Any] | None  # chat: the template's own variables, e.g. enable_thinking
    # chat: functions the model may call, as OpenAI writes them: {"type": "function", "function": {"name": ...,
    # "description": ..., "parameters": a JSON schema}} (or the function's fields alone)
    tools: Sequence[Mapping[str, Any]] | None
    # chat: "auto" (the default with tools; needs the server's tool-call parser), "required", "none", or a
    # function's name, which the reply then calls
    tool_choice: str | None
    parallel_tool_calls: bool | None  # chat: False allows one call alone
    request_id: str | None  # generated by the server when left out
    model: str | None  # the cluster's model when left out
    timeout: float | None  # this call's deadline in seconds (default: the client's)
    metadata: Metadata  # extra gRPC metadata for this call


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "logprobs", "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "min_tokens", "min_p", "prompt_logprobs", "skip_special_tokens",
                   "structured_output", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "priority")
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
_OPTIONS = frozenset(Options.__annotations__)


class _Requests:
    """What both clients send: the request messages and each call's deadline and metadata."""

    def __init__(self, api_key: str | None, timeout: float | None, metadata: Metadata):
        self.timeout = timeout
        self.metadata = tuple(metadata) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())

    def call(self, timeout: float | None = None, metadata: Metadata = ()) -> dict[str, Any]:
        return dict(timeout=self.timeout if timeout is None else timeout, metadata=self.metadata + tuple(metadata))

    def generate(self, prompt: str | Sequence[int], options: Options) -> tuple[pb.GenerateRequest, dict]:
        request = pb.GenerateRequest(sampling=_sampling(options), **_ids(options))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            with _invalid("prompt"):
                request.token_ids.ids.extend(prompt)
            request.token_ids.SetInParent()  # an empty list is still a token-id prompt (the server refuses it)
        return request, self.call(options.get("timeout"), options.get("metadata", ()))

    def chat(self, messages: Messages, options: Options) -> tuple[pb.ChatRequest, dict]:
        request = pb.ChatRequest(sampling=_sampling(options), continue_final_message=bool(
            options.get("continue_final_message")), **_ids(options))
        if options.get("chat_template_kwargs") is not None:
            with _invalid("chat_template_kwargs"):
                request.chat_template_kwargs.update(options["chat_template_kwargs"])
        for i, message in enumerate(messages):
            with _invalid(f"messages[{i}]"):
                if isinstance(message, dict):
                    request.messages.add(role=message.get("role"), content=message.get("content") or "",
                                         tool_calls=[_tool_call(c) for c in message.get("tool_calls") or ()],
                                         tool_call_id=message.get("tool_call_id") or "")
                else:
                    role, content = message
                    request.messages.add(role=role, content=content)
        for i, tool in enumerate(options.get("tools") or ()):
            with _invalid(f"tools[{i}]"):
                function = tool.get("function", tool)
                request.tools.add(name=function.get("name"), description=function.get("description"),
                                  parameters=function.get("parameters"))
        choice = options.get("tool_choice")
        if choice is not None:
            if choice in ("auto", "required", "none"):
                request.tool_choice.mode = choice
            else:
                request.tool_choice.function = choice
        if options.get("parallel_tool_calls") is not None:
            request.parallel_tool_calls = options["parallel_tool_calls"]
        return request, self.call(options.get("timeout"), options.get("metadata", ()))


def _embed_request(prompt: str | Sequence[int], model: str | None, dimensions: int | None,
                   truncate_prompt_tokens: int | None, cache_salt: str | None,
                   request_id: str | None) -> pb.EmbedRequest:
    with _invalid("dimensions"):
        request = pb.EmbedRequest(dimensions=dimensions or 0)
    return _last_token_request(request, prompt, model, truncate_prompt_tokens, cache_salt, request_id)


def _classify_request(prompt: str | Sequence[int], model: str | None, truncate_prompt_tokens: int | None,
                      cache_salt: str | None, request_id: str | None) -> pb.ClassifyRequest:
    return _last_token_request(pb.ClassifyRequest(), prompt, model, truncate_prompt_tokens, cache_salt, request_id)


def _last_token_request(request: R, prompt: str | Sequence[int], model: str | None,
                        truncate_prompt_tokens: int | None, cache_salt: str | None, request_id: str | None) -> R:
    """An Embed or Classify request's fields they share, filled in."""
    request.model, request.cache_salt, request.request_id = model or "", cache_salt or "", request_id or ""
    if truncate_prompt_tokens is not None:
        with _invalid("truncate_prompt_tokens"):
            request.truncate_prompt_tokens = truncate_prompt_tokens
    if isinstance(prompt, str):
        request.text = prompt
    else:
        with _invalid("prompt"):
            request.token_ids.ids.extend(prompt)
        request.token_ids.SetInParent()
    return request


def _embedding(response: pb.EmbedResponse) -> Embedding:
    return Embedding(list(response.embedding), _usage(response.usage))


def _classification(response: pb.ClassifyResponse) -> Classification:
    return Classification(response.label, list(response.probs), list(response.labels), _usage(response.usage))


def _usage(usage: pb.Usage) -> Usage:
    return Usage(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)


def _tool_call(call: ToolCall | Mapping[str, Any]) -> pb.ToolCall:
    """A call as a response gave it, or in OpenAI's layout ({"id", "function": {"name", "arguments"}})."""
    if isinstance(call, ToolCall):
        return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
    function = call.get("function") or {}
    return pb.ToolCall(id=call.get("id"), name=function.get("name"), arguments=function.get("arguments"))


@contextmanager
def _invalid(name: str) -> Iterator[None]:
    """Turns a value protobuf refuses (wrong type, out of range) into INVALID_ARGUMENT naming the field."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise TandemError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e}") from None


def _sampling(options: Options) -> pb.SamplingParams:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}; expected {sorted(_OPTIONS)}")
    sampling = pb.SamplingParams()
    for name in SAMPLING_FIELDS:
        value = options.get(name)
        if value is None:
            continue
        with _invalid(name):
            if name in ("stop", "stop_token_ids", "allowed_token_ids", "bad_words"):
                getattr(sampling, name).extend([value] if isinstance(value, str) else value)
            elif name == "logit_bias":
                sampling.logit_bias.update(value)
            elif name == "structured_output":
                _structured(sampling.structured_output, value)
            else:
                setattr(sampling, name, value)
    return sampling


def _structured(message: pb.StructuredOutput, spec: Mapping[str, Any]) -> None:
    if len(spec) != 1 or next(iter(spec)) not in STRUCTURED_KINDS:
        raise ValueError(f"give exactly one of {', '.join(STRUCTURED_KINDS)}, got {sorted(spec)}")
    ((kind, value),) = spec.items()
    if kind == "choice":
        message.choice.choices.extend([value] if isinstance(value, str) else value)
    else:
        setattr(message, kind, value if kind != "json" or isinstance(value, str) else json.dumps(value))


def _ids(options: Options) -> dict[str, str]:
    return {name: options.get(name) or "" for name in ("model", "request_id", "cache_salt")}


def _chunk(response: pb.GenerateResponse) -> Chunk:
    stop = response.WhichOneof("stop_reason")
    return Chunk(request_id=response.request_id, text=response.text, token_ids=list(response.token_ids),
                 logprobs=[dict(entry.logprobs) for entry in response.logprobs] or None,
                 finish_reason=response.finish_reason or None,
                 stop_reason=getattr(response, stop) if stop else None,
                 usage=Usage(response.usage.prompt_tokens, response.usage.cached_tokens,
                             response.usage.completion_tokens) if response.HasField("usage") else None,
                 ttft=_ttft(response.ttft) if response.HasField("ttft") else None,
                 prompt_logprobs=[dict(entry.logprobs) for entry in response.prompt_logprobs] or None,
                 reasoning_text=response.reasoning_text,
                 tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in response.tool_calls] or None,
                 tool_call_deltas=[ToolCallDelta(d.index, d.id or None, d.name or None, d.arguments)
                                   for d in response.tool_call_deltas] or None)


def _ttft(ttft: pb.TimeToFirstToken) -> TimeToFirstToken:
    return TimeToFirstToken(**{f.name: getattr(ttft, f.name) for f in ttft.DESCRIPTOR.fields})


def _error(error: grpc.RpcError) -> TandemError:
    return TandemError(error.code(), error.details() or "")


def _credentials(tls: bool, root_certificates: Pem | None, private_key: Pem | None,
                 certificate_chain: Pem | None) -> grpc.ChannelCredentials | None:
    if not (tls or root_certificates or private_key or certificate_chain):
        return None

    def read(pem: Pem | None) -> bytes | None:
        return pem if pem is None or isinstance(pem, bytes) else Path(pem).read_bytes()

    return grpc.ssl_channel_credentials(read(root_certificates), read(private_key), read(certificate_chain))


def _channel_options(options: Sequence[tuple[str, Any]], retries: int) -> list[tuple[str, Any]]:
    """The caller's channel arguments, and a service config that retries UNAVAILABLE calls (gRPC allows at most
    5 attempts) unless they bring their own."""
    if not 0 <= retries <= _MAX_RETRIES:
        raise ValueError(f"retries must be in [0, {_MAX_RETRIES}] (gRPC makes at most {_MAX_RETRIES + 1} attempts), "
                         f"got {retries}")
    options = list(options)
    if retries and not any(name == "grpc.service_config" for name, _ in options):
        policy = {"maxAttempts": retries + 1, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE"]}
        options.append(("grpc.service_config", json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": policy}]})))
    return options


_MAX_RETRIES = 4


def _serving(status: int) -> bool:
    return status == health_pb2.HealthCheckResponse.SERVING


_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _StreamingCall:
    """One streaming call, started by `start` at the first chunk asked for; leaving early (break, close(), the
    `with` block's end, or dropping the stream) cancels it."""

    def __init__(self, start: Callable[[], Any]):
        self._start, self._call, self._done = start, None, False

    def close(self) -> None:
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True

    def __del__(self) -> None:  # a stream dropped mid-way (a `for` left by break) cancels its call
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the channel or its event loop is already gone
            pass


class Stream(_StreamingCall):
    """The chunks of one streaming call (see _StreamingCall)."""

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            if self._call is None:
                self._call = self._start()
            return _chunk(next(self._call))
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as e:
            self._done = True
            raise _error(e) from None
        except BaseException:  # KeyboardInterrupt while waiting: the request must not run on
            self.close()
            raise

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TandemClient:
    """Tandem's gRPC API over one channel. `timeout` is the default deadline of every call in seconds (None: no
    deadline); `api_key` is sent as 'authorization: Bearer <key>'; TLS is on with `tls=True` (the system's root
    certificates) or when any of `root_certificates`, `private_key`, `certificate_chain` (mutual TLS) is given,
    each a PEM file's path or its bytes. A call refused with UNAVAILABLE before any answer (a replica draining,
    a lost connection, no worker group free) is tried again up to `retries` times, after 0.2 s to 2 s (gRPC's retry
    policy, within the call's deadline); a stream that has received a chunk is never tried again, so nothing is
    generated twice. `options` are gRPC channel arguments; a "grpc.service_config" among them replaces the
    retries."""

    def __init__(self, url: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: Pem | None = None, private_key: Pem | None = None,
                 certificate_chain: Pem | None = None, timeout: float | None = None, metadata: Metadata = (),
                 options: Sequence[tuple[str, Any]] = (), retries: int = 3):
        credentials = _credentials(tls, root_certificates, private_key, certificate_chain)
        options = _channel_options(options, retries)
        self._channel = grpc.secure_channel(url, credentials, options) if credentials \
            else grpc.insecure_channel(url, options)
        self._stub = tandem_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._requests = _Requests(api_key, timeout, metadata)

    def generate(self, prompt: str | Sequence[int], **options: Unpack[Options]) -> Completion:
        """The whole completion of a prompt (text, or token ids used as they are)."""
        return _collect(self.stream(prompt, **options))

    def stream(self, prompt: str | Sequence[int], **options: Unpack[Options]) -> Stream:
        request, call = self._requests.generate(prompt, options)
        return Stream(lambda: self._stub.Generate(request, **call))

    def chat(self, messages: Messages, **options: Unpack[Options]) -> Completion:
        """The reply to a conversation: {"role": ..., "content": ...} dicts or (role, content) pairs."""
        return _collect(self.chat_stream(messages, **options))

    def chat_stream(self, messages: Messages, **options: Unpack[Options]) -> Stream:
        request, call = self._requests.chat(messages, options)
        return Stream(lambda: self._stub.Chat(request, **call))

    def embed(self, prompt: str | Sequence[int], *, model: str | None = None, dimensions: int | None = None,
              truncate_prompt_tokens: int | None = None, cache_salt: str | None = None,
              request_id: str | None = None, timeout: float | None = None) -> Embedding:
        """The prompt's embedding: its last token's hidden state at unit length; with `dimensions`, the first that
        many values, normalized again."""
        request = _embed_request(prompt, model, dimensions, truncate_prompt_tokens, cache_salt, request_id)
        return _embedding(self._unary(self._stub.Embed, request, timeout))

    def classify(self, prompt: str | Sequence[int], *, model: str | None = None,
                 truncate_prompt_tokens: int | None = None, cache_salt: str | None = None,
                 request_id: str | None = None, timeout: float | None = None) -> Classification:
        """A classifier's or reward model's class probabilities for the prompt, and its likeliest class."""
        request = _classify_request(prompt, model, truncate_prompt_tokens, cache_salt, request_id)
        return _classification(self._unary(self._stub.Classify, request, timeout))

    def tokenize(self, text: str, *, model: str | None = None, timeout: float | None = None) -> list[int]:
        response = self._unary(self._stub.Tokenize, pb.TokenizeRequest(model=model or "", text=text), timeout)
        return list(response.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False, model: str | None = None,
                   timeout: float | None = None) -> str:
        with _invalid("token_ids"):
            request = pb.DetokenizeRequest(model=model or "", token_ids=token_ids,
                                           skip_special_tokens=skip_special_tokens)
        return self._unary(self._stub.Detokenize, request, timeout).text

    def models(self, *, timeout: float | None = None) -> list[Model]:
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [Model(m.id, m.max_model_len, m.block_size, m.parent or None) for m in response.models]

    def load_lora_adapter(self, name: str, path: str, *, load_inplace: bool = False,
                          timeout: float | None = None) -> None:
        """Serves the PEFT adapter at `path` (absolute, where the worker groups run) as model `name` (the server
        needs api.allow_runtime_lora)."""
        request = pb.LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=load_inplace)
        self._unary(self._stub.LoadLoRAAdapter, request, timeout)

    def unload_lora_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self._unary(self._stub.UnloadLoRAAdapter, pb.UnloadLoRAAdapterRequest(lora_name=name), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True when the server reports SERVING; False when it is not serving, draining or unreachable."""
        try:
            return _serving(self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                        timeout).status)
        except TandemError as e:
            if e.code in _UNREACHABLE:
                return False
            raise

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, **self._requests.call(timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collect(chunks: Stream) -> Completion:
    completion = Completion()
    with chunks:
        for chunk in chunks:
            completion.add(chunk)
    return completion


class AsyncStream(_StreamingCall):
    """The chunks of one streaming call on asyncio; as Stream (`async for`, `async with`, close())."""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._call is None:
                self._call = self._start()
            response = await self._call.read()
        except grpc.RpcError as e:
            self._done = True
            raise _error(e) from None
        except BaseException:  # this task was cancelled: so is the call
            self.close()
            raise
        if response is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        return _chunk(response)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncTandemClient:
    """TandemClient on grpc.aio: the same arguments and methods, awaited (streams are async iterators). Create
    it inside the event loop that uses it."""

    def __init__(self, url: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: Pem | None = None, private_key: Pem | None = None,
                 certificate_chain: Pem | None = None, timeout: float | None = None, metadata: Metadata = (),
                 options: Sequence[tuple[str, Any]] = (), retries: int = 3):
        credentials = _credentials(tls, root_certificates, private_key, certificate_chain)
        options = _channel_options(options, retries)
        self._channel = grpc.aio.secure_channel(url, credentials, options) if credentials \
            else grpc.aio.insecure_channel(url, options)
        self._stub = tandem_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._requests = _Requests(api_key, timeout, metadata)

    async def generate(self, prompt: str | Sequence[int], **options: Unpack[Options]) -> Completion:
        return await _collect_async(self.stream(prompt, **options))

    def stream(self, prompt: str | Sequence[int], **options: Unpack[Options]) -> AsyncStream:
        request, call = self._requests.generate(prompt, options)
        return AsyncStream(lambda: self._stub.Generate(request, **call))

    async def chat(self, messages: Messages, **options: Unpack[Options]) -> Completion:
        return await _collect_async(self.chat_stream(messages, **options))

    def chat_stream(self, messages: Messages, **options: Unpack[Options]) -> AsyncStream:
        request, call = self._requests.chat(messages, options)
        return AsyncStream(lambda: self._stub.Chat(request, **call))

    async def embed(self, prompt: str | Sequence[int], *, model: str | None = None, dimensions: int | None = None,
                    truncate_prompt_tokens: int | None = None, cache_salt: str | None = None,
                    request_id: str | None = None, timeout: float | None = None) -> Embedding:
        request = _embed_request(prompt, model, dimensions, truncate_prompt_tokens, cache_salt, request_id)
        return _embedding(await self._unary(self._stub.Embed, request, timeout))

    async def classify(self, prompt: str | Sequence[int], *, model: str | None = None,
                       truncate_prompt_tokens: int | None = None, cache_salt: str | None = None,
                       request_id: str | None = None, timeout: float | None = None) -> Classification:
        request = _classify_request(prompt, model, truncate_prompt_tokens, cache_salt, request_id)
        return _classification(await self._unary(self._stub.Classify, request, timeout))

    async def tokenize(self, text: str, *, model: str | None = None, timeout: float | None = None) -> list[int]:
        response = await self._unary(self._stub.Tokenize, pb.TokenizeRequest(model=model or "", text=text), timeout)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False,
                         model: str | None = None, timeout: float | None = None) -> str:
        with _invalid("token_ids"):
            request = pb.DetokenizeRequest(model=model or "", token_ids=token_ids,
                                           skip_special_tokens=skip_special_tokens)
        return (await self._unary(self._stub.Detokenize, request, timeout)).text

    async def models(self, *, timeout: float | None = None) -> list[Model]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [Model(m.id, m.max_model_len, m.block_size, m.parent or None) for m in response.models]

    async def load_lora_adapter(self, name: str, path: str, *, load_inplace: bool = False,
                                timeout: float | None = None) -> None:
        request = pb.LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=load_inplace)
        await self._unary(self._stub.LoadLoRAAdapter, request, timeout)

    async def unload_lora_adapter(self, name: str, *, timeout: float | None = None) -> None:
        await self._unary(self._stub.UnloadLoRAAdapter, pb.UnloadLoRAAdapterRequest(lora_name=name), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        try:
            return _serving((await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                               timeout)).status)
        except TandemError as e:
            if e.code in _UNREACHABLE:
                return False
            raise

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, **self._requests.call(timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _collect_async(chunks: AsyncStream) -> Completion:
    completion = Completion()
    async with chunks:
        async for chunk in chunks:
            completion.add(chunk)
    return completion


__all__ = ["AsyncStream", "AsyncTandemClient", "Chunk", "Classification", "Completion", "Embedding", "Model", "Options",
           "Stream", "TandemClient", "TandemError", "TimeToFirstToken", "Usage"]
