"""Fuzzing the running server: property-based requests to both APIs of one real disaggregated cluster (a prefill
and a decode group of a tiny random Llama, the gRPC server in the ingress, Serve's HTTP proxy in front).

The property, for every gRPC message Hypothesis builds (wild prompts, token ids, sampling values, stop strings,
salts, model names, API keys), for raw bytes sent to every RPC, and for every HTTP body (JSON of the right and
the wrong types, and bytes that are not JSON): the answer is OK or one of the statuses tandem.proto and
router/errors.py document for a client's mistake (INVALID_ARGUMENT / 400, NOT_FOUND / 404, UNAUTHENTICATED /
401, RESOURCE_EXHAUSTED / 413 / 429), never INTERNAL, UNKNOWN or a 5xx; a stream that is served ends normally.
Afterwards the health service says SERVING, a plain request is served, and no KV block is held on either pool.

Examples are derandomized (the same every run) and bounded, so the module takes a minute or two on a 2-core
machine; parametrized edge cases pin the values that broke the server before.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.api_config import ApiConfig
from tests.cluster.test_grpc_api import assert_no_blocks_held
from tests.conftest import SERVE_HTTP_URL

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

APP = "tandem-fuzz"
GRPC_PORT = 17101
KEY = "fuzz-key"
VOCAB, CONTEXT = 49152, 1024
MAX_TOKENS, MAX_REQUEST_BYTES = 16, 64 * 1024
OK, INVALID, NOT_FOUND, UNAUTHENTICATED, EXHAUSTED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                                      grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                                                      grpc.StatusCode.RESOURCE_EXHAUSTED)
# What a client's request may earn from a healthy, idle cluster: INVALID_ARGUMENT (a bad field, or bytes that do
# not decode), NOT_FOUND (a model not served), UNAUTHENTICATED (the key), RESOURCE_EXHAUSTED (over the size limit).
GRPC_ANSWERS = {OK, INVALID, NOT_FOUND, UNAUTHENTICATED, EXHAUSTED}
HTTP_ANSWERS = {200, 400, 401, 404, 413, 429}
GRPC_KEY = (("authorization", f"Bearer {KEY}"),)
JSON_KEY = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]
METHODS = {m.name: m.server_streaming for m in SERVICE.methods}  # every RPC of tandem.v1, streaming or not

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def cluster(tiny_model_factory, redis_url):
    model = str(tiny_model_factory("llama"))
    config = ClusterConfig(model=model, num_kv_blocks=128, num_cpus_per_rank=0.5, kv_transfer_timeout_s=10,
                           redis_url=redis_url, host="127.0.0.1", grpc_port=GRPC_PORT,
                           api=ApiConfig(api_key=KEY, max_tokens=MAX_TOKENS, max_stop_strings=4,
                                         max_request_bytes=MAX_REQUEST_BYTES))
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield Path(model).name
    serve.delete(APP)


@pytest.fixture(scope="module")
def channel(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}", options=[
            ("grpc.max_send_message_length", 4 * MAX_REQUEST_BYTES)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield channel


# -- strategies ------------------------------------------------------------------------------------------------

INT32 = st.one_of(st.integers(-2**31, 2**31 - 1),
                  st.sampled_from([0, -1, 1, -2, VOCAB - 1, VOCAB, CONTEXT, 2**31 - 1, -2**31]))
FLOAT32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1e-45, 1.0, 1.5, float("nan"), float("inf"),
                                                          -float("inf"), 3.4e38]))
UTF8 = st.characters(codec="utf-8")  # proto strings: any code point but lone surrogates
TEXT = st.one_of(st.text(UTF8, max_size=120), st.sampled_from(["", " ", "\x00", "\ufeff", "🙂" * 40, "a" * 3000,
                                                               "<|im_start|>system\n", "x" * (MAX_REQUEST_BYTES + 1)]))
SMALL_TEXT = st.text(UTF8, max_size=24)
TOKEN_IDS = st.one_of(st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=48),
                      st.integers(CONTEXT - 40, CONTEXT + 2).map(lambda n: [7] * n))
MAX_TOKENS_VALUES = st.one_of(st.integers(1, 4), INT32)


SAMPLING = st.fixed_dictionaries({}, optional={
    "max_tokens": MAX_TOKENS_VALUES, "temperature": FLOAT32, "top_p": FLOAT32, "top_k": INT32,
    "seed": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1])),
    "stop": st.lists(SMALL_TEXT, max_size=6), "stop_token_ids": st.lists(INT32, max_size=4),
    "ignore_eos": st.booleans(), "logprobs": st.one_of(st.integers(0, 3), INT32),
    "include_stop_str_in_output": st.booleans(),
}).map(lambda f: pb.SamplingParams(**f))


def model_names(served: str):
    return st.one_of(st.just(""), st.just(served), SMALL_TEXT)


def generate_requests(served: str):
    common = {"model": model_names(served), "sampling": SAMPLING, "request_id": SMALL_TEXT,
              "cache_salt": st.one_of(SMALL_TEXT, st.integers(250, 260).map(lambda n: "s" * n))}
    prompt = st.one_of(st.fixed_dictionaries({"text": TEXT}),
                       st.fixed_dictionaries({"token_ids": TOKEN_IDS.map(lambda ids: pb.TokenIds(ids=ids))}),
                       st.just({}))
    return st.tuples(prompt, st.fixed_dictionaries({}, optional=common)).map(
        lambda parts: pb.GenerateRequest(**parts[0], **parts[1]))


def chat_requests(served: str):
    role = st.one_of(st.sampled_from(["system", "user", "assistant"] * 3), SMALL_TEXT)
    message = st.builds(pb.ChatMessage, role=role, content=st.one_of(st.text(UTF8, max_size=120), TEXT))
    return st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={
        "model": model_names(served), "sampling": SAMPLING, "request_id": SMALL_TEXT, "cache_salt": SMALL_TEXT,
    }).map(lambda f: pb.ChatRequest(**f))


# Authorization values other than the key (the properties below send the key; one property sends these).
WRONG_KEYS = st.one_of(st.sampled_from(["Bearer wrong", "", "Bearer", f"bearer {KEY}", f"Bearer {KEY} ",
                                        f"Basic {KEY}", KEY, f"Bearer {KEY}{KEY}"]),
                       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30))


# -- gRPC ------------------------------------------------------------------------------------------------------

def count(outcome: str) -> None:
    """Hypothesis's statistics (--hypothesis-show-statistics) count the answers, to show what the fuzzing reached."""
    if currently_in_test_context():
        event(outcome)


def grpc_answer(call: Callable[[], object], streaming: bool) -> tuple[grpc.StatusCode, str, list]:
    """(status, details, responses) of `call()`."""
    try:
        responses = list(call()) if streaming else [call()]
    except grpc.RpcError as e:
        code, details, responses = e.code(), e.details() or "", []
    else:
        code, details = OK, ""
    count(f"gRPC {code.name}")
    return code, details, responses


def check_stream(code: grpc.StatusCode, details: str, responses: list) -> None:
    """A documented status; a served stream ends once, normally, within the max_tokens cap."""
    assert code in GRPC_ANSWERS, f"{code}: {details}"
    if code is OK:
        last = responses[-1]
        assert last.finish_reason in ("stop", "length"), last
        assert all(not r.finish_reason for r in responses[:-1])
        assert last.usage.completion_tokens == sum(len(r.token_ids) for r in responses) <= MAX_TOKENS


# The edges, pinned: float32's smallest temperature and top_p, the largest seed, a prompt one token short of the
# context, the most logprobs.
GENERATE_EDGES = [
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2, temperature=1e-45, seed=2**64 - 1,
                                                             top_p=1e-45, top_k=2**31 - 1)),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (CONTEXT - 1)), sampling=pb.SamplingParams(max_tokens=1,
                                                                                                  logprobs=20)),
]


@pytest.mark.parametrize("request_", GENERATE_EDGES, ids=["tiny temperature", "context-long prompt"])
def test_generate_edges(channel, request_):
    stub = tandem_pb2_grpc.GenerationStub(channel)
    code, details, responses = grpc_answer(lambda: stub.Generate(request_, metadata=GRPC_KEY, timeout=60), True)
    assert code is OK, details
    check_stream(code, details, responses)


@FUZZ
@given(data=st.data())
def test_generate_answers_ok_or_a_documented_status(channel, cluster, data):
    request = data.draw(generate_requests(cluster), "request")
    stub = tandem_pb2_grpc.GenerationStub(channel)
    check_stream(*grpc_answer(lambda: stub.Generate(request, metadata=GRPC_KEY, timeout=60), True))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_chat_answers_ok_or_a_documented_status(channel, cluster, data):
    request = data.draw(chat_requests(cluster), "request")
    stub = tandem_pb2_grpc.GenerationStub(channel)
    check_stream(*grpc_answer(lambda: stub.Chat(request, metadata=GRPC_KEY, timeout=60), True))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_tokenize_detokenize_and_list_models_answer_ok_or_a_documented_status(channel, cluster, data):
    stub = tandem_pb2_grpc.GenerationStub(channel)
    method = data.draw(st.sampled_from(["Tokenize", "Detokenize", "ListModels"]), "method")
    if method == "Tokenize":
        request = pb.TokenizeRequest(model=data.draw(model_names(cluster)), text=data.draw(TEXT))
    elif method == "Detokenize":
        request = pb.DetokenizeRequest(model=data.draw(model_names(cluster)), token_ids=data.draw(
            st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=64)), skip_special_tokens=data.draw(
            st.booleans()))
    else:
        request = pb.ListModelsRequest()
    code, details, _ = grpc_answer(lambda: getattr(stub, method)(request, metadata=GRPC_KEY, timeout=60), False)
    assert code in GRPC_ANSWERS, f"{code}: {details}"


@settings(FUZZ, max_examples=40)
@given(key=WRONG_KEYS, method=st.sampled_from(sorted(METHODS)), data=st.data())
def test_a_wrong_api_key_is_unauthenticated_whatever_the_request(channel, cluster, key, method, data):
    request = {"Generate": generate_requests(cluster), "Chat": chat_requests(cluster),
               "Tokenize": st.builds(pb.TokenizeRequest, text=TEXT),
               "LoadLoRAAdapter": st.builds(pb.LoadLoRAAdapterRequest, lora_name=TEXT, lora_path=TEXT),
               }.get(method, st.builds(getattr(pb, SERVICE.methods_by_name[method].input_type.name)))
    call = getattr(tandem_pb2_grpc.GenerationStub(channel), method)
    code, details, _ = grpc_answer(lambda: call(data.draw(request), metadata=(("authorization", key),), timeout=60),
                                   METHODS[method])
    assert code is UNAUTHENTICATED or code is EXHAUSTED and "larger than max" in details, f"{code}: {details}"


def valid_bytes(served: str) -> list[bytes]:
    return [pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2)).SerializeToString(),
            pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")]).SerializeToString(),
            pb.TokenizeRequest(model=served, text="hello").SerializeToString(),
            pb.DetokenizeRequest(token_ids=[1, 2, 3]).SerializeToString()]


def mutated(data: st.DataObject, base: bytes) -> bytes:
    """A valid message cut short, with bytes flipped, or with bytes appended (fields unknown to tandem.v1)."""
    how = data.draw(st.sampled_from(["cut", "flip", "append"]))
    if how == "cut":
        return base[:data.draw(st.integers(0, max(0, len(base) - 1)))]
    if how == "append":
        return base + data.draw(st.binary(min_size=1, max_size=20))
    flipped = bytearray(base)
    for i in data.draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=4)):
        flipped[i] ^= data.draw(st.integers(1, 255))
    return bytes(flipped)


def call_raw(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str, list]:
    streaming = METHODS[method]
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(f"/tandem.v1.Generation/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return grpc_answer(lambda: call(payload, metadata=GRPC_KEY, timeout=60), streaming)


@FUZZ
@given(data=st.data())
def test_raw_bytes_to_every_rpc_are_served_or_refused_never_internal(channel, cluster, data):
    method = data.draw(st.sampled_from(sorted(METHODS)), "method")
    payload = data.draw(st.one_of(st.binary(max_size=200), st.sampled_from(valid_bytes(cluster))), "payload")
    if data.draw(st.booleans(), "mutate"):
        payload = mutated(data, payload or b"\x0a\x00")
    code, details, _ = call_raw(channel, method, payload)
    assert code in GRPC_ANSWERS, f"{method} {payload!r}: {code}: {details}"


# -- HTTP ------------------------------------------------------------------------------------------------------

def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    request = urllib.request.Request(SERVE_HTTP_URL + path, body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def check_http(status: int, content_type: str, body: bytes, sent: bytes) -> None:
    count(f"HTTP {status}")
    assert status in HTTP_ANSWERS, f"{status} for {sent[:300]!r}: {body[:500]!r}"
    if status != 200:
        error = json.loads(body)["error"]
        assert error["code"] == status and error["type"] != "internal_error", error
    elif content_type.startswith("text/event-stream"):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), events[-3:]
        assert not any('"error"' in e for e in events), [e for e in events if '"error"' in e]
    else:
        answer = json.loads(body)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer


# JSON values of every type, to put where a field expects another.
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), SMALL_TEXT,
                         st.sampled_from([2**64, 2**64 - 1, 2**63, -1, 0, 1e308, 1e-300, "", "1", [], {}]))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(SMALL_TEXT, inner, max_size=3), max_leaves=6)


def bodies(required: dict, optional: dict):
    """JSON bodies from {field: (valid values, odd values)}: half of them well typed with values the server should
    serve (so the fuzzing reaches generation), half with each field valid, odd or any JSON at all."""
    def pick(index: int, spec: dict) -> dict:
        return {name: values[0] if index == 0 else st.one_of(values[0], values[1], JSON_ANY)
                for name, values in spec.items()}

    return st.one_of(*(st.fixed_dictionaries(pick(i, required), optional=pick(i, optional)) for i in (0, 1)))


PROMPT_TEXT = st.text(UTF8, min_size=1, max_size=120)
HTTP_COMMON = {
    "max_tokens": (st.integers(1, 4), MAX_TOKENS_VALUES),
    "temperature": (st.floats(0, 2), st.floats()),
    "top_p": (st.floats(0.01, 1), st.floats(-1, 2)),
    "top_k": (st.integers(-1, 50), st.integers(-2**70, 2**70)),
    "seed": (st.integers(0, 2**64 - 1), st.integers(-2**70, 2**70)),
    "stop": (st.one_of(PROMPT_TEXT, st.lists(PROMPT_TEXT, max_size=4)), st.lists(SMALL_TEXT, max_size=8)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=4), st.lists(st.integers(-5, VOCAB + 5))),
    "n": (st.just(1), st.integers(0, 3)),
    "stream": (st.booleans(), st.none()),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"include_usage": 2})),
    "user": (SMALL_TEXT, st.integers()),
    "presence_penalty": (st.just(0), st.floats()),
    "frequency_penalty": (st.just(0.0), st.floats()),
    "ignore_eos": (st.booleans(), st.none()),
    "request_id": (SMALL_TEXT, st.none()),
    "cache_salt": (SMALL_TEXT, st.integers(250, 260).map(lambda n: "s" * n)),
    "frobnicate": (JSON_ANY, JSON_ANY),  # unknown fields are ignored
}


def completion_bodies(served: str):
    prompt = st.one_of(PROMPT_TEXT, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=48),
                       st.lists(PROMPT_TEXT, min_size=1, max_size=1),
                       st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1, max_size=1))
    odd_prompt = st.one_of(TEXT, TOKEN_IDS, st.lists(SMALL_TEXT, max_size=3), st.lists(TOKEN_IDS, max_size=2))
    return bodies({"prompt": (prompt, odd_prompt)}, {
        "model": (st.just(served), SMALL_TEXT), **HTTP_COMMON, "logprobs": (st.integers(0, 5), st.integers(-1, 22)),
        "echo": (st.just(False), st.just(True)), "suffix": (st.just(""), SMALL_TEXT),
        "best_of": (st.just(1), st.integers(0, 3))})


def chat_bodies(served: str):
    part = st.fixed_dictionaries({"type": st.just("text"), "text": PROMPT_TEXT})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                     "content": st.one_of(PROMPT_TEXT, st.none(), st.lists(part, max_size=2))})
    odd_message = st.fixed_dictionaries({"role": st.one_of(SMALL_TEXT, JSON_ANY), "content": st.one_of(TEXT, JSON_ANY)})
    return bodies({"messages": (st.lists(message, min_size=1, max_size=3), st.lists(odd_message, max_size=3))}, {
        "model": (st.just(served), SMALL_TEXT), **HTTP_COMMON,
        "max_completion_tokens": (st.integers(1, 4), MAX_TOKENS_VALUES), "logprobs": (st.booleans(), st.integers()),
        "top_logprobs": (st.integers(0, 5), st.integers(-1, 22))})


# The key, with or without a content type (the body is read as JSON either way); now and then no key or a wrong one.
HEADERS = st.sampled_from([JSON_KEY] * 4 + [{"authorization": f"Bearer {KEY}"}, {"content-type": "application/json"},
                                           {"authorization": "Bearer wrong", "content-type": "text/plain"}])


# A seed past uint64 failed the decode group's whole batch (torch's generators take at most 2**64 - 1): now it is a
# 400 naming the seed; a negative one is a signed 64-bit seed (-1: none). A temperature that float32 rounds to 0 is
# served.
COMPLETION_EDGES = {"seed 2**64": (dict(seed=2**64, temperature=0.5), 400), "seed 2**70": (dict(seed=2**70), 400),
                    "seed 2**64 - 1": (dict(seed=2**64 - 1, temperature=0.5), 200),
                    "seed -1": (dict(seed=-1, temperature=0.5), 200),
                    "seed -2**63": (dict(seed=-2**63, temperature=0.5), 200),
                    "seed -2**63 - 1": (dict(seed=-2**63 - 1, temperature=0.5), 400),
                    "temperature 1e-300": (dict(temperature=1e-300), 200)}


@pytest.mark.parametrize("edge", list(COMPLETION_EDGES))
def test_completion_edges(cluster, edge):
    fields, expected = COMPLETION_EDGES[edge]
    sent = json.dumps({"model": cluster, "prompt": "hi", "max_tokens": 2, **fields}).encode()
    status, content_type, body = post("/v1/completions", sent, JSON_KEY)
    check_http(status, content_type, body, sent)
    assert status == expected and (status == 200 or json.loads(body)["error"]["param"] == "seed"), body


@FUZZ
@given(data=st.data())
def test_completions_answer_200_or_a_documented_error_never_5xx(cluster, data):
    sent = json.dumps(data.draw(completion_bodies(cluster), "body")).encode()
    check_http(*post("/v1/completions", sent, data.draw(HEADERS, "headers")), sent)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_chat_completions_answer_200_or_a_documented_error_never_5xx(cluster, data):
    sent = json.dumps(data.draw(chat_bodies(cluster), "body")).encode()
    check_http(*post("/v1/chat/completions", sent, data.draw(HEADERS, "headers")), sent)


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_bodies_that_are_not_json_objects_are_400s(cluster, data):
    valid = json.dumps({"model": cluster, "prompt": "hi", "max_tokens": 2}).encode()
    body = data.draw(st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{",
                                                                         b"NaN", valid[:-1], valid + b"}"]),
                               st.integers(0, len(valid)).map(lambda n: valid[:n])), "body")
    path = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), "path")
    status, content_type, answer = post(path, body, JSON_KEY)
    check_http(status, content_type, answer, body)
    assert status == 400 or body == valid


# -- afterwards ------------------------------------------------------------------------------------------------

def test_after_the_fuzzing_the_server_is_healthy_and_no_block_is_leaked(channel):
    """Runs after the properties above (tests run in file order)."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    responses = list(tandem_pb2_grpc.GenerationStub(channel).Generate(
        pb.GenerateRequest(text="a probe", sampling=pb.SamplingParams(max_tokens=8, temperature=0.0,
                                                                      ignore_eos=True)),
        metadata=GRPC_KEY, timeout=60))
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == 8
    status, _, body = post("/v1/completions", json.dumps({"prompt": "a probe", "max_tokens": 2}).encode(),
                           JSON_KEY)
    assert status == 200, body
    assert_no_blocks_held(APP)
