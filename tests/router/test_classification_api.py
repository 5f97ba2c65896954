"""A classifier served by a real cluster (Serve, a worker group, redis-server) answers POST /classify and gRPC
Classify with HF transformers' class probabilities, and refuses what it cannot do (generate, embed) naming the
model; a cross-encoder (a classifier of one class, relevance) scores and reranks pairs of texts read together."""

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from ray import serve
from transformers import AutoTokenizer

from cluster.app import build_app
from cluster.client import TandemClient, TandemError
from cluster.config import ClusterConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from tests.conftest import SERVE_HTTP_URL
from tests.engine.test_classification import SENTIMENT, hf_probs, random_prompt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP, GRPC_PORT = "tandem-classifier", 17121
RERANKER_APP, RERANKER_GRPC_PORT = "tandem-reranker", 17122


@pytest.fixture(scope="module")
def classifier(tiny_classifier_factory, redis_url):
    model = tiny_classifier_factory("llama", SENTIMENT)
    config = ClusterConfig(model=str(model), served_model_name="sentiment", num_kv_blocks=32, num_cpus_per_rank=0.5,
                           disaggregate=False, redis_url=redis_url, grpc_port=GRPC_PORT)
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield model
    serve.delete(APP)


@pytest.fixture(scope="module")
def reranker(tiny_classifier_factory, redis_url):
    """A second cluster, under /reranker: a cross-encoder."""
    model = tiny_classifier_factory("qwen2", ("relevance",))
    config = ClusterConfig(model=str(model), num_kv_blocks=32, num_cpus_per_rank=0.5, disaggregate=False,
                           redis_url=redis_url, grpc_port=RERANKER_GRPC_PORT)
    serve.run(build_app(config), name=RERANKER_APP, route_prefix="/reranker")
    yield model
    serve.delete(RERANKER_APP)


def post(path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{SERVE_HTTP_URL}{path}", json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_classify_gives_each_inputs_probabilities_and_likeliest_class(classifier):
    prompts = [random_prompt(1, 9), random_prompt(2, 40)]
    status, body = post("/v1/classify", {"model": "sentiment", "input": prompts})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "sentiment" and body["id"].startswith("classify-")
    assert body["usage"] == {"prompt_tokens": 49, "total_tokens": 49, "completion_tokens": 0}
    for i, (prompt, item) in enumerate(zip(prompts, body["data"])):
        expected = hf_probs(classifier, prompt)
        assert (item["index"], item["num_classes"], item["label"]) == (i, 3, SENTIMENT[int(expected.argmax())])
        torch.testing.assert_close(torch.tensor(item["probs"], dtype=torch.float32), expected, atol=1e-5, rtol=0)


def test_grpc_classify_gives_the_same(classifier):
    prompt = random_prompt(3, 20)
    with TandemClient(f"127.0.0.1:{GRPC_PORT}") as client:
        result = client.classify(prompt, timeout=60)
    assert result.labels == list(SENTIMENT) and result.usage.prompt_tokens == 20
    torch.testing.assert_close(torch.tensor(result.probs), hf_probs(classifier, prompt), atol=1e-5, rtol=0)
    assert result.label == SENTIMENT[max(range(3), key=result.probs.__getitem__)]


def test_a_classifier_refuses_to_generate_or_embed_naming_the_model(classifier):
    for path, body in (("/v1/embeddings", {"input": "Hello"}), ("/v1/completions", {"prompt": "Hello"}),
                       ("/v1/score", {"text_1": "a", "text_2": "b"})):  # its classes are no relevance score
        status, error = post(path, body)
        assert status == 400 and error["error"]["param"] == "model" and "classifier" in error["error"]["message"]
    with TandemClient(f"127.0.0.1:{GRPC_PORT}") as client, pytest.raises(TandemError, match="classifier") as e:
        client.embed("Hello", timeout=60)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_a_cross_encoder_scores_and_reranks_each_pair_read_together(reranker):
    tokenizer = AutoTokenizer.from_pretrained(reranker)
    query, documents = "Which river runs through Paris?", ["The Seine.", "Bread rises with yeast.", "The Loire."]
    expected = [hf_probs(reranker, tokenizer(query, text_pair=d)["input_ids"])[0].item() for d in documents]
    status, scored = post("/reranker/v1/score", {"text_1": query, "text_2": documents})
    assert status == 200, scored
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    status, ranked = post("/reranker/rerank", {"query": query, "documents": documents, "top_n": 2})
    assert status == 200, ranked
    order = sorted(range(3), key=lambda i: -expected[i])
    assert [r["index"] for r in ranked["results"]] == order[:2]
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([expected[i] for i in order[:2]],
                                                                             abs=1e-5)


def requests_by_outcome() -> dict[str, float]:
    with urllib.request.urlopen(f"{SERVE_HTTP_URL}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("tandem_requests_total{")}


def test_grpc_refusals_before_the_ingress_count_as_http_ones_do(classifier):
    before = requests_by_outcome()
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        for call, status in ((pb.ClassifyRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND),
                             (pb.ClassifyRequest(), grpc.StatusCode.INVALID_ARGUMENT)):  # no prompt
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(call, timeout=30)
            assert refused.value.code() == status
    deadline = time.monotonic() + 10
    while True:  # the other ingress replica's counts reach a scrape within its period (2 s)
        counted = {o: requests_by_outcome()[o] - before[o] for o in ("not_found", "invalid_argument")}
        if counted == {"not_found": 1, "invalid_argument": 1} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == {"not_found": 1, "invalid_argument": 1}
