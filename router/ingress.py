"""The ingress: a request's path through the cluster, top to bottom.

validate and tokenize (the chat template for chat requests) -> hash the prompt's blocks (salted by cache_salt) ->
decide who prefills by router/policy.route over the KV index and the groups' loads: when a decode group already
holds most of the prompt (a conversation's next turn), it prefills the rest itself -> otherwise prefill on the
prefill replica with the least work (router/request_router.py ranks them inside Serve), which pins the prompt's KV
-> a decode replica pulls the KV it lacks from that group and streams the tokens -> back to the caller. In unified
mode (no prefill pool) the decode replica does all of it, as it does when no prefill group can take a request (the
pool is down or its group failed) and for a request that wants prompt logprobs. A caller that goes away (or whose
deadline passes) cancels the stream, which cancels the call on whichever group holds the request, so every block is
freed. A decode group lost mid-stream (a rank or its node died) does not end the request: it moves to another
decode group, which computes the prompt and the tokens already streamed and carries on from there (up to
api.migration_limit times). An embedding request (`embed`) goes to one group, a prefill group where there is a
prefill pool, which computes its prompt as any other and returns the prompt's vector instead of a token. Each replica
is also the cluster's front door: it serves the gRPC API (router/grpc_api.py) on its own port and the
OpenAI-compatible HTTP API (router/openai_api.py) through Serve's HTTP proxy. The ingress is stateless: any number
of replicas serve the same pools.
"""

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from router.api_config import ApiConfig
from router.errors import ApiError, Kind, classify, invalid
from router.kv_index import KVIndexFollower
from router.load_view import LoadView
from router.lora_registry import Adapter, LoRARegistry
from router.metrics import IngressMetrics
from router.policy import RouteDecision, RoutingWeights, route
from router.reasoning import reasoning_parser
from router.replica_metrics import ReplicaMetrics
from router.routing_hint import ROUTING_STATS_PERIOD_S, RoutingHint
from workers.caller_watch import Caller
from workers.engine.async_engine import release_quietly
from workers.engine.classification import Classes
from workers.engine.errors import LoRAError
from workers.engine.llm import chat_token_ids
from workers.engine.lora_folder import CONFIG_FILE
from workers.engine.outputs import Continuation, DeltaAssembler, RequestOutput, TimeToFirstToken, Usage
from workers.engine.sampling_params import SamplingParams
from workers.engine.validation import (
    bad_words_token_ids,
    check_embedding_request,
    check_request,
    prompt_token_ids,
    truncate_prompt,
)
from workers.kv.hashing import hash_full_blocks
from workers.replica_logging import use_serve_logging

logger = logging.getLogger(__name__)

# Before a request's first move to another decode group (or to another prefill group, after its own failed): a
# routing-stats period and the poll's own call, so the request router has seen the lost group's report and the move
# does not land on it; doubling for each further move, up to the most.
_MIGRATION_PAUSE_S, _MAX_MIGRATION_PAUSE_S = ROUTING_STATS_PERIOD_S + 0.25, 4.0


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of prompt, prompt_token_ids and messages."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # chat: role/content pairs, rendered with the model's template
    tools: list[dict] | None = None  # chat: OpenAI's function tools, for templates that describe them
    add_generation_prompt: bool = True  # chat: open the assistant's turn after the messages
    continue_final_message: bool = False  # chat: leave the last message open for the reply to continue
    chat_template_kwargs: dict[str, Any] | None = None  # chat: the template's own variables (enable_thinking, ...)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    cache_salt: str | None = None
    model: str | None = None  # None or "": the served model


@dataclass(frozen=True)
class EmbedRequest:
    """Exactly one of prompt and prompt_token_ids."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: as many as the context holds)
    dimensions: int | None = None  # keep the vector's first values, normalized again (Matryoshka embeddings)
    request_id: str | None = None
    cache_salt: str | None = None
    model: str | None = None  # None or "": the served model
    classify: bool = False  # a classifier's logits per class (ServedModel.classes) instead of an embedding


@dataclass(frozen=True)
class ServedModel:
    """What the ingress serves, as ListModels and /v1/models show it."""

    name: str
    path: str  # the local HF folder the groups load
    max_model_len: int
    vocab_size: int
    block_size: int
    hidden_size: int  # the length of its embeddings
    classes: Classes | None = None  # a classifier's, in the order of its logits; None for any other model
    adapters: tuple[str, ...] = ()  # the LoRA adapters every group loads at start, which requests name as `model`
    # Where an adapter a request names is looked for when it is not loaded: the folder <lora_dir>/<name>.
    lora_dir: str | None = None
    # SamplingParams fields a request that leaves them unset takes (the model's generation_config.json, unless
    # the config's generation_config is none); max_tokens caps each API's own default.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tally:
    """What a request's end is counted and logged with, filled in as it runs."""
    ttft: TimeToFirstToken | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic times of its outputs with new tokens
    usage: Usage | None = None


class Ingress:
    def __init__(self, prefill: DeploymentHandle | None, decode: DeploymentHandle, model: ServedModel,
                 api: ApiConfig | None = None, redis_url: str | None = None, weights: dict | None = None,
                 host: str = "0.0.0.0", grpc_port: int | None = None, decide: bool = True):
        """With `redis_url` the ingress reads the groups' load reports (for /metrics) and, with `decide` and a
        prefill pool, decides per request who prefills from the KV index and those loads; otherwise every
        request takes the prefill pool. With `grpc_port` the replica serves the gRPC API there once Serve has
        built it."""
        use_serve_logging()
        self.prefill = prefill
        self.decode = decode
        self.model = model
        self.api = api or ApiConfig()
        self.weights = RoutingWeights(**(weights or {}))
        self._index = KVIndexFollower(redis_url) if redis_url and prefill and decide else None
        self._loads = LoadView(redis_url) if redis_url else None
        self.redis_url = redis_url  # the HTTP API stores Responses API responses there
        self.lora = LoRARegistry(model.name, model.adapters, redis_url)
        self._resolving = asyncio.Lock()  # one adapter found in lora_dir is loaded at a time
        self.metrics = IngressMetrics(self._loads, self._index.index if self._index is not None else None,
                                      model.adapters, ReplicaMetrics(redis_url) if redis_url else None)
        self._active = 0  # requests this replica is serving, against api.max_concurrent_requests
        self.draining = False  # set by drain(): new requests are refused while those in flight finish
        self._index_started = False
        self._grpc_address = (host, grpc_port) if grpc_port is not None else None
        self._caller = Caller.current()  # the decode groups abort this replica's requests if it dies
        self._grpc = None
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.reasoning = reasoning_parser(self.api.reasoning_parser, self.tokenizer)
        if model.classes is not None:
            labels = model.classes.labels
            named = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
            logger.info("%s is a classifier (%s): it serves POST /classify and gRPC Classify%s; generation and "
                        "embeddings are refused", model.name, named,
                        ", and as a cross-encoder /v1/score and /v1/rerank" if len(labels) == 1 else "")
        if model.sampling_defaults:
            logger.info("a request that leaves them unset takes the model's generation_config.json values: %s "
                        "(generation_config none turns this off)",
                        ", ".join(f"{k}={v}" for k, v in model.sampling_defaults.items()))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; the first carries its time-to-first-token breakdown. Bad input raises
        before anything runs (an ApiError or an InvalidRequestError naming the field)."""
        received = time.monotonic()
        request = replace(request, request_id=request.request_id or uuid.uuid4().hex)
        with self._counted(request, received) as tally:
            async for out in self._generate(request, received):
                if out.ttft is not None:
                    tally.ttft = out.ttft
                if out.outputs[0].delta_token_ids:
                    tally.token_times.append(time.monotonic())
                tally.usage = out.usage
                yield out

    async def embed(self, request: EmbedRequest) -> RequestOutput:
        """An embedding request's final output, whose `embedding` is the prompt's unit-length vector (last-token
        pooling, workers/engine/model_runner.py), or with `classify`, a classifier's logits. A prefill group
        computes it where there is a prefill pool (its request router sends it where the prompt's prefix is
        cached), a decode group otherwise or when no prefill group can take it. Counted and logged with the other
        requests."""
        received = time.monotonic()
        request = replace(request, request_id=request.request_id or uuid.uuid4().hex)
        with self._counted(request, received) as tally:
            out = await self._embed(request)
            tally.usage = out.usage
            self.metrics.e2e.observe(time.monotonic() - received)
            if request.dimensions is not None:
                return replace(out, embedding=_shortened(out.embedding, request.dimensions))
            return out

    @contextmanager
    def _counted(self, request: GenerateRequest | EmbedRequest, received: float) -> Iterator[_Tally]:
        """Admits a request (it raises if the replica cannot take it), then counts it as active until it ends,
        when its outcome goes to the metrics and the log: ok, the error it raised, or cancelled where its caller
        left a stream (GeneratorExit)."""
        self.admit(request.request_id)
        self._active += 1
        self.metrics.request_started()
        tally, outcome, why = _Tally(), Kind.INTERNAL, ""
        try:
            yield tally
            outcome = Kind.OK
        except BaseException as e:
            error = classify(e) if not isinstance(e, GeneratorExit) else None
            outcome, why = (error.kind, error.message) if error is not None else (Kind.CANCELLED, "the caller left")
            raise
        finally:
            self._active -= 1
            adapter = request.model if request.model and self.lora.get(request.model) else None
            self.metrics.request_finished(outcome.name.lower(), tally.ttft, tally.token_times, tally.usage, adapter)
            _log_finished(request, outcome, why, time.monotonic() - received, tally.ttft, tally.usage)

    async def _embed(self, request: EmbedRequest) -> RequestOutput:
        await self.resolve_model(request.model)
        adapter = self.check_model(request.model) if request.model else None
        token_ids = self.validate_embedding(request)
        lora, lora_path = (adapter.key, adapter.path) if adapter is not None else (None, None)
        hint = RoutingHint(len(token_ids), hash_full_blocks(token_ids, self.model.block_size, request.cache_salt,
                                                            lora=lora))
        # An embedding is computed afresh wherever it goes, so a group lost while computing it (UNAVAILABLE) costs
        # the caller nothing while another takes it: the decode pool where the prefill pool could not, as for a
        # prefill, then another decode group, at most api.migration_limit times, as a stream moves.
        tries = ([self.prefill] if self.prefill is not None else []) + [self.decode] * (self.api.migration_limit + 1)
        for i, pool in enumerate(tries):
            try:
                with _serve_request_id(uuid.uuid4().hex):
                    return await _cancelling(pool.embed.remote(token_ids, request.request_id, request.cache_salt,
                                                               lora, lora_path, routing=hint))
            except Exception as e:
                error = classify(e)
                if error.kind is not Kind.UNAVAILABLE or i == len(tries) - 1:
                    raise
                logger.warning("%s: %s; another group embeds it", request.request_id, error.message)
                if tries[i + 1] is pool:  # the pool's request router must learn of the loss first
                    self.metrics.migrations.inc()
                    moves = i - tries.index(pool)
                    await asyncio.sleep(min(_MIGRATION_PAUSE_S * 2 ** moves, _MAX_MIGRATION_PAUSE_S))

    def validate_embedding(self, request: EmbedRequest) -> list[int]:
        """The token ids an embedding request's prompt is, after every check the engine would make (such a prompt
        may fill the context: nothing is generated) plus the API's limits."""
        if request.classify and self.model.classes is None:
            raise invalid("model", f"{self.model.name} has no classification head (only a "
                                   f"*ForSequenceClassification checkpoint classifies)")
        if self.model.classes is not None and not request.classify:
            raise invalid("model", f"{self.model.name} is a classifier: it serves POST /classify (gRPC Classify), "
                                   f"not embeddings")
        size = self.model.hidden_size
        if request.dimensions is not None and not 1 <= request.dimensions <= size:
            raise invalid("dimensions", f"must be in [1, {size}] (the model's embedding size), got "
                                        f"{request.dimensions}")
        given = [name for name in ("prompt", "prompt_token_ids") if getattr(request, name) is not None]
        if len(given) != 1:
            raise invalid("input", f"give exactly one of prompt and prompt_token_ids, got {given or 'none'}")
        _, token_ids = prompt_token_ids(self.tokenizer, request.prompt if request.prompt is not None
                                        else request.prompt_token_ids, self.model.vocab_size)
        keep, context = request.truncate_prompt_tokens, self.model.max_model_len
        if keep is not None:
            if keep != -1 and not 1 <= keep <= context:
                raise invalid("truncate_prompt_tokens", f"must be -1 or in [1, {context}] (the context length), "
                                                        f"got {keep}")
            token_ids = token_ids[-(context if keep == -1 else keep):]
        check_embedding_request(token_ids, context)
        self._check_cache_salt(request.cache_salt)
        return token_ids

    def _check_cache_salt(self, salt: str | None) -> None:
        if salt is not None and len(salt) > self.api.max_cache_salt_chars:
            raise invalid("cache_salt", f"at most {self.api.max_cache_salt_chars} characters, got {len(salt)}")

    def admit(self, request_id: str | None = None) -> None:
        """Refuses a new request while the replica drains (UNAVAILABLE) or serves its limit (RESOURCE_EXHAUSTED),
        and counts the refusal; a background response asks before it is accepted, as generate() does."""
        error = None
        if self.draining:
            error = ApiError(Kind.UNAVAILABLE, "this server is shutting down; retry on another replica")
        elif self.api.max_concurrent_requests is not None and self._active >= self.api.max_concurrent_requests:
            error = ApiError(Kind.RESOURCE_EXHAUSTED, f"this ingress replica is serving its limit of "
                                                      f"{self.api.max_concurrent_requests} requests; retry later")
        if error is not None:
            self.refused(error, request_id)
            raise error

    def refused(self, error: ApiError, request_id: str | None = None) -> None:
        """Counts and logs a request refused before generate() took it (bad input, no API key, a full replica)."""
        self.metrics.request_refused(error.kind.name.lower())
        logger.info("request %s: %s, refused: %s", request_id or "(unnamed)", error.kind.name.lower(), error.message)

    async def _generate(self, request: GenerateRequest, received: float) -> AsyncIterator[RequestOutput]:
        await self.resolve_model(request.model)
        token_ids = self.validate(request)
        request_id = request.request_id  # generate() named it
        salt, adapter = request.cache_salt, self.check_model(request.model) if request.model else None
        params = self._after_thinking(request, token_ids)
        if adapter is not None:
            params = replace(params, lora=adapter.key, lora_path=adapter.path)
        hashes = hash_full_blocks(token_ids, self.model.block_size, salt, lora=params.lora)
        outputs, prefilled = await self._start(token_ids, params, request_id, salt, hashes)
        # `head`: the request's first output, `last`: its latest; both None until the first.
        assembler, head, last, migrations = DeltaAssembler(), None, None, 0
        try:
            while True:
                try:
                    async for delta in outputs:
                        out = assembler.add(delta)
                        if head is None:
                            out.ttft = TimeToFirstToken.of(out.metrics, time.monotonic() - received)
                            head = out
                        elif migrations:
                            out = _as_first_served(out, head)
                        last = out
                        yield out
                    return
                except Exception as e:
                    error = classify(e)
                    if error.kind is not Kind.UNAVAILABLE or migrations == self.api.migration_limit:
                        raise
                    migrations += 1
                await _let_go(outputs, prefilled, request_id)
                prefilled = None
                outputs, prefilled = await self._migrate(token_ids, params, request_id, salt, hashes, last,
                                                         migrations, error)
        finally:
            if last is None or not last.finished:
                # The caller left (cancelled, deadline, disconnect): stop the request wherever it is.
                await _let_go(outputs, prefilled, request_id)

    async def _start(self, token_ids: list[int], params: SamplingParams, request_id: str, salt: str | None,
                     hashes: list, continuation: Continuation | None = None):
        """The request's stream from a decode group, and the prefill pool's handoff when a prefill group computed
        the prompt (and the continuation's tokens) for it; None when the decode group computes them itself."""
        num_tokens = len(token_ids) + (len(continuation.token_ids) if continuation is not None else 0)
        decision = await self._decide(num_tokens, hashes)
        hint = RoutingHint(num_tokens, hashes)  # each pool's request router picks the replica by its cost
        prefilled = None
        serve_id = uuid.uuid4().hex
        # The prompt logprobs come from the group that computes the prompt, and only the decode group streams.
        remote = decision is None or decision.prefill_group is not None
        if self.prefill is not None and remote and params.prompt_logprobs is None:
            prefilled = await self._prefill(token_ids, params, request_id, salt, hint, serve_id, continuation)
            if prefilled is not None:
                prefilled.source.claim(request_id)  # the decode call may wait in Serve's queue for a while
        with _serve_request_id(serve_id):
            if prefilled is None:
                # Unified mode, the decode group holds most of the prompt, the request wants prompt logprobs, or
                # no prefill group could take it: the decode group prefills (the rest of) the prompt itself.
                outputs = self.decode.options(stream=True).generate.remote(
                    token_ids, params, request_id, salt, continuation=continuation, routing=hint,
                    caller=self._caller)
            else:
                outputs = self.decode.options(stream=True).generate_prefilled.remote(
                    prefilled.handoff, params, prefilled.source, routing=hint, caller=self._caller)
        return outputs, prefilled

    async def _migrate(self, token_ids: list[int], params: SamplingParams, request_id: str, salt: str | None,
                       hashes: list, last: RequestOutput | None, migration: int, error: ApiError):
        """The request started again (`_start`) after the decode group streaming it was lost, as a continuation
        of what the caller received (up to `last`): the prompt and those tokens are computed again, by the prefill
        pool as for a new request, and the new decode group carries on, so the caller's stream goes on as if
        nothing had happened. A short pause first lets Serve and the request router learn that the lost group is
        gone (a group whose rank died reports itself out of service)."""
        self.metrics.migrations.inc()
        continuation = None
        if last is not None:
            continuation = Continuation.of(last)
            params = replace(params, prompt_logprobs=None)  # the caller has them, with the first output
        logger.warning("%s: its decode group was lost after %d token(s) (%s); moving it to another (%d of at most "
                       "%d)", request_id, len(continuation.token_ids) if continuation else 0,
                       error.message, migration, self.api.migration_limit)
        await asyncio.sleep(min(_MIGRATION_PAUSE_S * 2 ** (migration - 1), _MAX_MIGRATION_PAUSE_S))
        return await self._start(token_ids, params, request_id, salt, hashes, continuation)

    async def _prefill(self, token_ids: list[int], params, request_id: str, salt: str | None,
                       hint: RoutingHint, serve_id: str, continuation: Continuation | None):
        """The prefill pool's handoff, or None when no prefill group could take the request (the pool is down, or
        its group failed while prefilling): losing the prefill pool slows requests down, it does not fail them.
        Where the pool has another group, a request whose group failed tries that one first, after the pause that
        lets the request router rank the failed group last."""
        retried = False
        while True:
            try:
                with _serve_request_id(serve_id):
                    call = self.prefill.prefill.remote(token_ids, params, request_id, salt,
                                                       continuation=continuation, routing=hint)
                return await _cancelling(call)
            except Exception as e:
                error = classify(e)
                if error.kind is not Kind.UNAVAILABLE:
                    raise
                if retried or not await self._has_other_prefill_group():
                    logger.warning("%s: %s; the decode group prefills it", request_id, error.message)
                    return None
                logger.warning("%s: %s; another prefill group prefills it", request_id, error.message)
                retried = True
                await asyncio.sleep(_MIGRATION_PAUSE_S)

    async def _has_other_prefill_group(self) -> bool:
        """Whether more than one prefill group reports its load (the failed one's report lasts a few seconds)."""
        return self._loads is not None and len((await self._loads.loads()).get("prefill", [])) > 1

    async def _decide(self, num_tokens: int, hashes: list) -> RouteDecision | None:
        """router/policy.route over the index and the reported loads, for the one choice the ingress makes: who
        prefills. The replicas themselves are then chosen by each pool's request router, which also counts the
        requests in flight that the once-a-second load reports miss. None until both pools have reported."""
        if self._index is None:
            return None
        if not self._index_started:
            self._index_started = True
            await self._index.start()
        loads = await self._loads.loads()
        if not loads.get("decode") or not loads.get("prefill"):
            return None
        return route(num_tokens, self.model.block_size, self._index.index.match(hashes), loads["prefill"],
                     loads["decode"], self.weights)

    def validate(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids, after every check the engine would make plus the API's limits."""
        token_ids = self.prompt_token_ids(request)
        params, api = request.params, self.api
        check_request(token_ids, params, self.model.vocab_size, self.model.max_model_len)
        max_tokens = min(api.max_tokens or self.model.max_model_len, self.model.max_model_len)
        if params.max_tokens > max_tokens:
            raise invalid("max_tokens", f"at most {max_tokens}, got {params.max_tokens}")
        if len(params.stop) > api.max_stop_strings:
            raise invalid("stop", f"at most {api.max_stop_strings} stop strings, got {len(params.stop)}")
        if len(params.bad_words) > api.max_bad_words:
            raise invalid("bad_words", f"at most {api.max_bad_words} words, got {len(params.bad_words)}")
        bad_words_token_ids(self.tokenizer, params, self.model.vocab_size)
        self._check_cache_salt(request.cache_salt)
        return token_ids

    def _after_thinking(self, request: GenerateRequest, token_ids: list[int]) -> SamplingParams:
        """A structure (a format, or a forced tool call) holds a reasoning model's answer, not its thinking
        (router/reasoning.py)."""
        params, spec = request.params, request.params.structured_output
        if self.reasoning is None or spec is None or request.messages is None:
            return params
        return replace(params, structured_output=self.reasoning.held(spec, token_ids))

    def prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        """The token ids the model sees for the request's prompt: its text tokenized, its ids as they are, or its
        messages rendered with the chat template; the last of them only with truncate_prompt_tokens."""
        if request.model:
            self.check_model(request.model)
        given = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(request, name) is not None]
        if len(given) != 1:
            raise invalid("prompt", f"give exactly one of prompt, prompt_token_ids and messages, got "
                                    f"{given or 'none'}")
        if request.messages is not None:
            token_ids = self._chat_token_ids(request)
        else:
            _, token_ids = prompt_token_ids(self.tokenizer, request.prompt if request.prompt is not None
                                            else request.prompt_token_ids, self.model.vocab_size)
        return truncate_prompt(token_ids, request.params, self.model.max_model_len)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False, field: str = "token_ids") -> str:
        vocab = self.model.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def model_names(self) -> tuple[str, ...]:
        """What requests may give as `model`: the model's name, then its LoRA adapters'."""
        return self.model.name, *self.lora.names

    def check_model(self, name: str) -> Adapter | None:
        """The LoRA adapter a request's `model` names, None for the base model; any other name is NOT_FOUND."""
        if name == self.model.name:
            return None
        adapter = self.lora.get(name)
        if adapter is not None:
            return adapter
        served = ", ".join(repr(n) for n in self.model_names)
        raise ApiError(Kind.NOT_FOUND, f"model: {name!r} is not served here; this cluster serves {served}", "model")

    async def resolve_model(self, name: str | None) -> None:
        """Loads the adapter a request names when it is not loaded yet and lora_dir holds it (vLLM's filesystem
        LoRA resolver, Ray Serve LLM's dynamic LoRA loading); a name it does not hold is left to check_model."""
        if not name or name == self.model.name or self.lora.get(name) is not None:
            return
        folder = self._in_lora_dir(name)
        if folder is None:
            return
        async with self._resolving:
            if self.lora.get(name) is not None:  # loaded meanwhile by a request before this one
                return
            try:
                await self._load_lora_adapter(name, folder, replace_loaded=False, path_field="model")
            except ApiError:
                await self.lora.read()
                if self.lora.get(name) is None:  # not another ingress replica's load that came first
                    raise

    def _in_lora_dir(self, name: str) -> str | None:
        """<lora_dir>/<name> if it is an adapter folder inside lora_dir (a name may hold "/", never "..")."""
        if self.model.lora_dir is None or ".." in name.split("/") or name.startswith("/"):
            return None
        folder = Path(self.model.lora_dir, name)
        return str(folder) if (folder / CONFIG_FILE).is_file() else None

    async def load_lora_adapter(self, name: str, path: str, replace_loaded: bool = False) -> None:
        """Serves a LoRA adapter from now on (vLLM's /v1/load_lora_adapter; `replace_loaded` is its load_inplace):
        a decode group loads it, checking the folder and the adapter against the model itself, before it is
        recorded for every ingress replica (router/lora_registry.py). Other groups load it when a request names
        it."""
        self._check_runtime_lora()
        await self._load_lora_adapter(name, path, replace_loaded)

    async def _load_lora_adapter(self, name: str, path: str, replace_loaded: bool,
                                 path_field: str = "lora_path") -> None:
        """`path_field`: the request field a bad folder is blamed on."""
        if not name:
            raise invalid("lora_name", "must not be empty")
        if name == self.model.name or name in self.lora.started_with:
            raise invalid("lora_name", f"{name!r} is {'the model' if name == self.model.name else 'an adapter'} "
                                       "this cluster started with; give the adapter another name")
        if not path.startswith("/"):
            raise invalid(path_field, f"must be an absolute path, where every worker group reads the adapter "
                                      f"(got {path!r})")
        if self.lora.get(name) is not None and not replace_loaded:
            raise ApiError(Kind.INVALID_ARGUMENT, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        adapter = self.lora.new(name, path)
        try:
            await self.decode.load_adapter.remote(adapter.key, path)
        except LoRAError as e:  # the group's (through Serve, its cause's) names the adapter by its key
            raise invalid(path_field, str(getattr(e, "cause", e)).replace(repr(adapter.key), repr(name))) from None
        await self.lora.add(adapter, replace_loaded)
        logger.info("LoRA adapter %r loaded from %s (groups know it as %r)", name, path, adapter.key)

    async def unload_lora_adapter(self, name: str) -> None:
        """Stops serving an adapter loaded while the cluster runs (vLLM's /v1/unload_lora_adapter). Requests
        running under it finish; groups drop its weights when they need the room (max_loras)."""
        self._check_runtime_lora()
        if name in self.lora.started_with:
            raise invalid("lora_name", f"{name!r} is an adapter this cluster started with (lora_modules), which "
                                       "stays")
        await self.lora.remove(name)
        logger.info("LoRA adapter %r unloaded", name)

    def _check_runtime_lora(self) -> None:
        if not self.api.allow_runtime_lora:
            raise ApiError(Kind.NOT_FOUND, "loading LoRA adapters while the cluster runs is off; start it with "
                                           "api.allow_runtime_lora (--api-allow-runtime-lora)")

    def model_name(self, requested: str | None) -> str:
        """The name a response gives: the adapter's where the request named one, else the served model's."""
        return requested if requested and self.check_model(requested) else self.model.name

    def _chat_token_ids(self, request: GenerateRequest) -> list[int]:
        messages = request.messages
        if not messages:
            raise invalid("messages", "must not be empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise invalid(f"messages[{i}]", "must have a string role and a string content")
            if message["role"] not in ("system", "user", "assistant", "tool"):
                raise invalid(f"messages[{i}].role", f"must be system, user, assistant or tool, got "
                                                     f"{message['role']!r}")
        if request.continue_final_message and request.add_generation_prompt:
            raise invalid("continue_final_message", "a reply either continues the last message or opens a new "
                                                    "turn: send add_generation_prompt: false with it")
        return chat_token_ids(self.tokenizer, messages, request.add_generation_prompt, request.continue_final_message,
                              request.tools, request.chat_template_kwargs)

    async def __serve_build_asgi_app__(self):
        """Serve calls this once the replica is constructed: open the gRPC port here, on the replica's event
        loop, and hand Serve the HTTP app."""
        from router.grpc_api import start_grpc_server
        from router.openai_api import build_http_app

        if self._grpc_address is not None:
            self._grpc = await start_grpc_server(self, *self._grpc_address)
        if self.api.allow_runtime_lora or self.model.lora_dir is not None:
            self.lora.follow()
        if self.metrics.replicas is not None:
            self.metrics.replicas.start(self.metrics.samples)
        return build_http_app(self)

    async def check_health(self) -> None:
        if self._grpc is not None:
            self._grpc.check_health()

    async def drain(self, timeout_s: float) -> str:
        """Stops taking requests (gRPC UNAVAILABLE and health NOT_SERVING, HTTP 503) and waits up to `timeout_s`
        for those in flight to finish. Returns this replica's id, so a caller draining through a handle knows when
        it has reached every replica."""
        from ray import serve

        self.draining = True
        if self._grpc is not None:
            await self._grpc.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._active:
            logger.warning("drain: %d request(s) still running after %.0f s", self._active, timeout_s)
        return serve.get_replica_context().replica_id.unique_id

    async def __del__(self):
        """Serve's graceful shutdown: refuse new gRPC calls (UNAVAILABLE), let running ones finish, and the
        requests no call waits on (background responses) too, for as long as Serve grants; then leave this
        replica's counts in the other replicas' /metrics as retired ones (router/replica_metrics.py)."""
        if self._grpc is not None:
            await self._grpc.drain()
        while self._active:
            await asyncio.sleep(0.1)
        if self.metrics.replicas is not None:
            await self.metrics.replicas.stop(self.metrics.counts())


def _log_finished(request: GenerateRequest | EmbedRequest, outcome: Kind, why: str, total_s: float,
                  ttft: TimeToFirstToken | None, usage: Usage | None) -> None:
    """One line per request, as an access log has, whichever API it came by (no prompt text: that is the
    caller's)."""
    served = f" ({request.model})" if request.model else ""
    tokens = f", prompt {usage.prompt_tokens} tokens ({usage.cached_tokens} cached), {usage.generated_tokens} " \
             f"generated" if usage is not None else ""
    first = f", first token after {ttft.total_s:.3f} s" if ttft is not None else ""
    cause = f": {why}" if why else ""
    logger.info("request %s%s: %s after %.3f s%s%s%s", request.request_id, served, outcome.name.lower(), total_s,
                first, tokens, cause)


def _shortened(vector: list[float], dimensions: int) -> list[float]:
    """A Matryoshka embedding's first `dimensions` values, at unit length again (OpenAI's `dimensions`)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head))
    return [v / norm for v in head] if norm else head


async def _let_go(outputs, prefilled, request_id: str) -> None:
    """Stops the request's decode stream and unpins its KV on the prefill group that holds it, if one does, so
    that group does not hold the blocks for the whole lease."""
    outputs.cancel()
    if prefilled is not None:
        await release_quietly(prefilled.source, request_id)


def _as_first_served(out: RequestOutput, head: RequestOutput) -> RequestOutput:
    """An output of a migrated request as the caller's first group would have made it: the prompt's cached tokens
    and prompt logprobs are those of that group (the next one computed the prompt again)."""
    return replace(out, num_cached_tokens=head.num_cached_tokens,
                   prompt_logprobs=head.prompt_logprobs if out.finished else None)


@contextmanager
def _serve_request_id(serve_id: str) -> Iterator[None]:
    """Serve calls made here carry `serve_id` as their internal request id. A call inherits the id of the Serve
    request it is made in, and Serve's routers key pending requests by it, so the several cluster requests of one
    HTTP request (an OpenAI request's n choices) would be mistaken for each other: one routed twice, the others
    never. Serve's log lines keep the HTTP request's id."""
    token = serve_context._serve_request_context.set(
        replace(serve_context._get_serve_request_context(), _internal_request_id=serve_id))
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


async def _cancelling(response):
    """Awaits a Serve call; if the caller is cancelled meanwhile, the call is cancelled too (Serve only does
    that by itself for calls made while handling a Serve request, and gRPC calls are not)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
