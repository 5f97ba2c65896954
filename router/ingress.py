"""The ingress: a request's path through the cluster, top to bottom.

validate and tokenize (the chat template for chat requests) -> hash the prompt's blocks (salted by cache_salt)
-> decide who prefills by router/policy.route over the KV index and the groups' loads: when a decode group
already holds most of the prompt (a conversation's next turn), it prefills the rest itself -> otherwise prefill
on the prefill replica with the least work (router/request_router.py ranks them inside Serve), which pins the
prompt's KV -> a decode replica pulls the KV it lacks from that group and streams the tokens -> back to the
caller. In unified mode (no prefill pool) the decode replica does all of it. A caller that goes away cancels the
stream, which aborts the request on whichever group holds it, so every block is freed.

The ingress is stateless: any number of replicas serve the same pools.
"""

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse
from transformers import AutoConfig, AutoTokenizer

from router.kv_index import KVIndexFollower
from router.load_view import LoadView
from router.policy import RouteDecision, RoutingWeights, route
from router.request_router import RoutingHint
from workers.engine.async_engine import release_quietly
from workers.engine.errors import InvalidRequestError, PromptTooLongError
from workers.engine.llm import chat_token_ids
from workers.engine.model_store import resolve_model
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.kv.hashing import hash_full_blocks
from workers.server import Prefilled

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of prompt, prompt_token_ids and messages."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None  # chat: role/content pairs, rendered with the model's template
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    cache_salt: str | None = None


class Ingress:
    def __init__(self, prefill: DeploymentHandle | None, decode: DeploymentHandle, model: str, block_size: int = 16,
                 redis_url: str | None = None, weights: dict | None = None):
        """With `redis_url` (and a prefill pool) the ingress decides per request who prefills, from the KV index
        and the groups' reported loads; without it every request takes the prefill pool."""
        self.prefill = prefill
        self.decode = decode
        self.block_size = block_size
        self.weights = RoutingWeights(**(weights or {}))
        self._index = KVIndexFollower(redis_url) if redis_url and prefill else None
        self._loads = LoadView(redis_url) if redis_url and prefill else None
        self._index_started = False
        model_dir = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_config = AutoConfig.from_pretrained(model_dir)
        self.vocab_size = hf_config.vocab_size
        self.max_model_len = hf_config.max_position_embeddings

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        token_ids = self.tokenize(request)
        request_id = request.request_id or uuid.uuid4().hex
        params, salt = request.params, request.cache_salt
        hashes = hash_full_blocks(token_ids, self.block_size, salt)
        decision = await self._decide(len(token_ids), hashes)
        if self.prefill is None or (decision is not None and decision.prefill_group is None):
            # Unified mode, or the decode group holds most of the prompt: it prefills the rest itself.
            hint = RoutingHint(len(token_ids), hashes, decision.decode_group if decision else None)
            outputs = self.decode.options(stream=True).generate.remote(token_ids, params, request_id, salt,
                                                                       routing=hint)
            async for out in outputs:
                yield out
            return
        prefill_hint = RoutingHint(len(token_ids), hashes, decision.prefill_group if decision else None)
        decode_hint = RoutingHint(len(token_ids), hashes, decision.decode_group if decision else None)
        prefilled: Prefilled = await self.prefill.prefill.remote(token_ids, params, request_id, salt,
                                                                 routing=prefill_hint)
        outputs = self.decode.options(stream=True).generate_prefilled.remote(prefilled.handoff, params,
                                                                             prefilled.source, routing=decode_hint)
        finished = False
        try:
            async for out in outputs:
                finished = out.finished
                yield out
        finally:
            if not finished:  # left before the decode replica took the KV: don't hold the blocks for the lease
                await release_quietly(prefilled.source, request_id)

    async def _decide(self, num_tokens: int, hashes: list) -> RouteDecision | None:
        """router/policy.route over the index and the reported loads; None until both pools have reported."""
        if self._index is None:
            return None
        if not self._index_started:
            self._index_started = True
            await self._index.start()
        loads = await self._loads.loads()
        if not loads.get("decode") or not loads.get("prefill"):
            return None
        return route(num_tokens, self.block_size, self._index.index.match(hashes), loads["prefill"],
                     loads["decode"], self.weights)

    async def __call__(self, http: Request) -> JSONResponse:
        """POST /generate with JSON {prompt | prompt_token_ids | messages, max_tokens, temperature, top_p, top_k,
        seed, stop, cache_salt}: the whole completion as one JSON object. Bad input is a 400 naming the field."""
        if http.method != "POST" or http.url.path.rstrip("/") != "/generate":
            return JSONResponse({"error": "POST /generate"}, status_code=404)
        try:
            body = await http.json()
            sampling = {k: body.pop(k) for k in list(body) if k in _SAMPLING_FIELDS}
            if "stop" in sampling:
                sampling["stop"] = tuple(sampling["stop"])
            request = GenerateRequest(**body, params=SamplingParams(**sampling))
            outs = [out async for out in self.generate(request)]
        except (ValueError, TypeError) as e:
            field_name = getattr(e, "field", None)
            return JSONResponse({"error": str(e), "field": field_name}, status_code=400)
        out = outs[-1]
        completion = out.outputs[0]
        return JSONResponse({"request_id": out.request_id, "text": completion.text,
                             "token_ids": completion.token_ids, "finish_reason": completion.finish_reason,
                             "usage": vars(out.usage)})

    def tokenize(self, request: GenerateRequest) -> list[int]:
        given = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(request, name) is not None]
        if len(given) != 1:
            raise InvalidRequestError("prompt", f"give exactly one of prompt, prompt_token_ids and messages, got "
                                                f"{given or 'none'}")
        if request.messages is not None:
            if not request.messages:
                raise InvalidRequestError("messages", "must not be empty")
            token_ids = chat_token_ids(self.tokenizer, request.messages)
        elif request.prompt is not None:
            if not request.prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            token_ids = self.tokenizer.encode(request.prompt)
        else:
            token_ids = list(request.prompt_token_ids)
            bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if not token_ids or bad is not None:
                raise InvalidRequestError("prompt_token_ids", "must be a non-empty list of ids in "
                                                              f"[0, {self.vocab_size}), got {bad!r}")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len - 1)
        return token_ids
