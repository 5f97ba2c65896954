"""The HTTP API's endpoints for what a model makes of a prompt's last token: embeddings and what is computed
from them, and a classifier's classes (router/openai_api.py serves the rest):

    POST /v1/embeddings          input (a string or token ids, or a batch of them) -> each one's vector: the last
                                 token's hidden state, unit length (last-token pooling); dimensions keeps the first
                                 values, normalized again; encoding_format base64 sends little-endian float32s
    POST /v1/score, /score       vLLM's: text_1 against each text_2 (or pair by pair) -> the cosine of their
                                 embeddings, or a cross-encoder's relevance score of the two read together
    POST /v1/rerank, /rerank, /v2/rerank  Jina AI's and Cohere's (vLLM's): a query and documents -> the documents
                                 most relevant first (scored as /score scores a pair), top_n of them
    POST /classify, /v1/classify  vLLM's (SGLang's path), for a classifier or reward model (a
                                 *ForSequenceClassification checkpoint): input -> each one's class probabilities and
                                 likeliest class

Each input is one cluster request (Ingress.embed), every input checked before any runs, all run at once.
"""

import asyncio
import base64
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from router.errors import ApiError, Kind, classify, invalid, renamed
from router.http_errors import PayloadTooLarge, error_response, refused_response
from router.ingress import EmbedRequest, Ingress
from router.openai_bodies import ClassifyBody, EmbeddingsBody, RerankBody, RerankDocument, ScoreBody
from workers.engine.classification import classified
from workers.engine.outputs import RequestOutput
from workers.engine.scoring import cosine, pair_token_ids, score_pairs

Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


class PoolingApi:
    def __init__(self, ingress: Ingress, read: Callable[[Request, type[Body]], Awaitable[Body]]):
        """`read`: the API's way to a request's body (its API key checked, its size limited, parsed)."""
        self.ingress = ingress
        self.read = read

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings: one cluster request per input, every input checked before any runs, all run at
        once; the first to fail fails the request and cancels the others."""
        def respond(body: EmbeddingsBody, request_id: str, outs: list[RequestOutput], tokens: int) -> dict:
            data = [{"object": "embedding", "index": i, "embedding": _encoded(out.embedding, body.encoding_format)}
                    for i, out in enumerate(outs)]
            return {"id": f"embd-{request_id}", "object": "list", "created": int(time.time()),
                    "model": self.ingress.model_name(body.model), "data": data,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await self._serve(request, EmbeddingsBody, _inputs, respond)

    async def classify(self, request: Request) -> Response:
        """vLLM's classify, for a classifier or reward model: each input's class probabilities and likeliest
        class (workers/engine/classification.py)."""
        classes = self.ingress.model.classes

        def respond(body: ClassifyBody, request_id: str, outs: list[RequestOutput], tokens: int) -> dict:
            data = []
            for i, out in enumerate(outs):
                result = classified(out.embedding, classes)
                data.append({"index": i, "label": result.label, "probs": result.probs,
                             "num_classes": len(classes.labels)})
            return {"id": f"classify-{request_id}", "object": "list", "created": int(time.time()),
                    "model": self.ingress.model_name(body.model), "data": data,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

        return await self._serve(request, ClassifyBody, _inputs, respond, classifier=True)

    async def score(self, request: Request) -> Response:
        """vLLM's score API: text_1 is one text scored against every text_2, or a list paired with text_2's one by
        one. An embedding model scores a pair by the cosine of its two embeddings; a cross-encoder (a reranker: a
        classifier whose one class is relevance) reads the two texts together and scores them with its class's
        probability, as vLLM scores with either."""
        cross = self._cross_encodes()

        def inputs(body: ScoreBody) -> list[tuple[str, str | list[int]]]:
            firsts, seconds = _texts(body.text_1), _texts(body.text_2)
            try:
                pairs = score_pairs(firsts, seconds)
            except ValueError as e:
                field, _, message = str(e).partition(": ")
                raise invalid(field, message) from None
            if cross:
                return [(field, pair_token_ids(self.ingress.tokenizer, firsts[i], seconds[j]))
                        for (field, _), (i, j) in zip(_named("text_2", body.text_2), pairs)]
            return [*_named("text_1", body.text_1), *_named("text_2", body.text_2)]

        def respond(body: ScoreBody, request_id: str, outs: list[RequestOutput], tokens: int) -> dict:
            if cross:
                scores = [self._relevance(out) for out in outs]
            else:
                firsts, seconds = outs[:len(_texts(body.text_1))], outs[len(_texts(body.text_1)):]
                pairs = score_pairs(firsts, seconds)
                scores = [cosine(firsts[i].embedding, seconds[j].embedding) for i, j in pairs]
            return {"id": f"score-{request_id}", "object": "list", "created": int(time.time()),
                    "model": self.ingress.model_name(body.model),
                    "data": [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await self._serve(request, ScoreBody, inputs, respond, classifier=cross)

    async def rerank(self, request: Request) -> Response:
        """The rerank API of Jina AI and Cohere (vLLM's /rerank): the documents most relevant to the query first,
        the top_n of them, each scored as score() scores the pair (query, document)."""
        cross = self._cross_encodes()

        def inputs(body: RerankBody) -> list[tuple[str, str | list[int]]]:
            if not body.documents:
                raise invalid("documents", "must not be empty")
            if body.top_n is not None and body.top_n < 1:
                raise invalid("top_n", f"must be a positive integer, got {body.top_n}")
            documents = _named("documents", [_document_text(d) for d in body.documents])
            if cross:
                return [(field, pair_token_ids(self.ingress.tokenizer, body.query, text)) for field, text in documents]
            return [("query", body.query), *documents]

        def respond(body: RerankBody, request_id: str, outs: list[RequestOutput], tokens: int) -> dict:
            if cross:
                scores = [self._relevance(out) for out in outs]
            else:
                scores = [cosine(outs[0].embedding, document.embedding) for document in outs[1:]]
            ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
            results = [{"index": i, "relevance_score": scores[i]} |
                       ({"document": {"text": _document_text(body.documents[i])}}
                        if body.return_documents is not False else {})
                       for i in ranked[:body.top_n]]
            return {"id": f"rerank-{request_id}", "model": self.ingress.model_name(body.model),
                    "usage": {"total_tokens": tokens}, "results": results}

        return await self._serve(request, RerankBody, inputs, respond, classifier=cross)

    def _cross_encodes(self) -> bool:
        """Whether the model scores a pair of texts read together: a classifier of one class."""
        classes = self.ingress.model.classes
        return classes is not None and len(classes.labels) == 1

    def _relevance(self, out: RequestOutput) -> float:
        return classified(out.embedding, self.ingress.model.classes).probs[0]

    async def _serve(self, request: Request, body_type: type[Body],
                     inputs: Callable[[Body], list[tuple[str, str | list[int]]]],
                     respond: Callable[[Body, str, list[RequestOutput], int], dict],
                     classifier: bool = False) -> Response:
        """The embedding endpoints' path: parse, then one cluster request per input (named by its field, which a
        refusal names), every input checked before any runs, all run at once (the first to fail fails the request
        and cancels the others), then `respond` with the outputs in order and the prompt tokens. With `classifier`,
        the requests ask a classifier for its logits instead."""
        try:
            body = await self.read(request, body_type)
            request_id = body.request_id or uuid.uuid4().hex
            requests = self._embed_requests(inputs(body), body, request_id, classifier)
        except PayloadTooLarge as e:
            self.ingress.refused(ApiError(Kind.INVALID_ARGUMENT, str(e)))
            return refused_response(e)
        except Exception as e:
            error = classify(e)
            self.ingress.refused(error)
            return error_response(error)
        try:
            outs = await _together([self.ingress.embed(r) for r in requests])
        except Exception as e:
            return error_response(classify(e))
        return JSONResponse(respond(body, request_id, outs, sum(len(out.prompt_token_ids) for out in outs)))

    def _embed_requests(self, inputs: list[tuple[str, str | list[int]]], body: BaseModel, request_id: str,
                        classifier: bool) -> list[EmbedRequest]:
        """One request per (field, prompt), as token ids; a bad prompt is refused naming its field."""
        limit = self.ingress.api.max_embedding_inputs
        if len(inputs) > limit:
            raise invalid(inputs[-1][0].partition("[")[0], f"at most {limit} inputs per request, got {len(inputs)}")
        requests = []
        for i, (field, item) in enumerate(inputs):
            text = isinstance(item, str)
            request = EmbedRequest(prompt=item if text else None, prompt_token_ids=None if text else item,
                                   truncate_prompt_tokens=body.truncate_prompt_tokens,
                                   dimensions=getattr(body, "dimensions", None),
                                   request_id=f"{request_id}-{i}" if len(inputs) > 1 else request_id,
                                   cache_salt=body.cache_salt, model=body.model, classify=classifier)
            try:
                token_ids = self.ingress.validate_embedding(request)
            except Exception as e:
                raise renamed(classify(e), {"prompt": field, "prompt_token_ids": field}) from None
            requests.append(replace(request, prompt=None, prompt_token_ids=token_ids, truncate_prompt_tokens=None))
        return requests


async def _together(calls: list[Awaitable[T]]) -> list[T]:
    """The calls' results, in order, run at once: the first to fail cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as e:
        raise e.exceptions[0] from None
    return [task.result() for task in tasks]


def _inputs(body: EmbeddingsBody | ClassifyBody) -> list[tuple[str, str | list[int]]]:
    """Each prompt of `input` (a text or token ids, or a list of either) with the field that names it."""
    if isinstance(body.input, list) and body.input and not isinstance(body.input[0], int):
        return [(f"input[{i}]", item) for i, item in enumerate(body.input)]
    return [("input", body.input)]


def _texts(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else texts


def _named(field: str, texts: str | list[str]) -> list[tuple[str, str]]:
    """Each text with the field that names it: `field`, or field[i] in a list."""
    return [(field, texts)] if isinstance(texts, str) else [(f"{field}[{i}]", t) for i, t in enumerate(texts)]


def _document_text(document: str | RerankDocument) -> str:
    return document if isinstance(document, str) else document.text


def _encoded(vector: list[float], encoding_format: str | None) -> list[float] | str:
    """A vector as OpenAI sends it: a list of numbers, or with base64 its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
