"""The Python client (cluster/client.py) and `tandem generate/chat --url`, against one real Serve app (unified
mode, `disaggregate: false`: no prefill pool, the decode pool's replicas prefill too; a tiny random Llama) over a
socket: whole results equal their streams, every RPC answers in plain dataclasses, server errors, deadlines and
client-side mistakes are TandemErrors with the gRPC code, a draining replica's refusal is tried again on another,
leaving a stream early cancels the request and frees its blocks, and the CLI prints the same completion or exits
1."""

import asyncio
import gc
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from ray import serve
from transformers import AutoTokenizer

from cluster.app import build_app
from cluster.client import (
    AsyncTandemClient,
    Chunk,
    Completion,
    Embedding,
    Model,
    TandemClient,
    TandemError,
    Usage,
)
from cluster.config import ClusterConfig
from router.grpc_api import start_grpc_server
from router.ingress import Ingress, ServedModel
from tests.hf_reference import hf_embedding, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[1]
PORT, APP = 16061, "tandem-client"
URL = f"127.0.0.1:{PORT}"
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = dict(max_tokens=400, temperature=0.0, ignore_eos=True)
INVALID, DEADLINE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def cluster(model, redis_url):
    config = ClusterConfig(model=model, num_kv_blocks=64, num_cpus_per_rank=0.5, disaggregate=False,
                           scheduling_policy="priority", redis_url=redis_url, grpc_port=PORT)
    serve.run(build_app(config), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


@pytest.fixture
def client(cluster):
    with TandemClient(URL, timeout=60) as client:
        yield client


def decode_stats():
    return serve.get_deployment_handle("decode", app_name=APP).stats.remote().result()


def wait_until_idle(timeout_s: float = 20.0):
    """The decode pool's stats once nothing runs and every block is free (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = decode_stats()
        if (stats.num_free_blocks == stats.num_blocks and stats.num_running + stats.num_waiting == 0) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def assert_idle(timeout_s: float = 20.0):
    stats = wait_until_idle(timeout_s)
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_blocks


def test_the_unified_app_has_no_prefill_pool_gives_hfs_tokens_and_serves_a_repeat_from_its_prefix_cache(client,
                                                                                                         model):
    prompt = [(11 * j) % 49152 for j in range(40)]  # no other test sends it: the first time, nothing is cached
    first, second = (client.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True) for _ in range(2))
    assert set(serve.status().applications[APP].deployments) == {"ingress", "decode"}
    assert first.token_ids == second.token_ids == hf_greedy(model, prompt, 8)
    assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, 32)


# -- every method -----------------------------------------------------------------------------------------------

def test_generate_returns_what_the_stream_streams(client, model):
    prompt = "The quick brown fox jumps over the lazy dog"
    completion = client.generate(prompt, **GREEDY)
    chunks = list(client.stream(prompt, **GREEDY))
    assert all(isinstance(c, Chunk) for c in chunks) and len(chunks) > 1
    assert completion.text == "".join(c.text for c in chunks) and completion.text
    assert completion.token_ids == [t for c in chunks for t in c.token_ids] and len(completion.token_ids) == 12
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert completion.finish_reason == "length" and completion.stop_reason is None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(model).encode(prompt))
    assert completion.ttft.total_s > 0 and completion.ttft.kv_transfer_bytes == 0  # unified: no transfer
    assert completion.request_id and completion.logprobs is None
    assert chunks[0].ttft is not None and chunks[-1].usage == completion.usage


def test_token_id_prompts_request_ids_stop_strings_and_logprobs_come_through(client):
    free = client.generate(list(range(300, 340)), **GREEDY)
    stop = free.text[3:6]
    stopped = client.generate(list(range(300, 340)), request_id="client-1", stop=stop, logprobs=2, **GREEDY)
    assert stopped.request_id == "client-1"
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[:free.text.index(stop)]
    assert len(stopped.logprobs) == len(stopped.token_ids)
    assert all(2 <= len(entry) <= 3 and all(isinstance(t, int) for t in entry) for entry in stopped.logprobs)
    assert stopped.usage.prompt_tokens == 40


def test_chat_takes_dicts_or_pairs_and_streams_the_same_reply(client):
    as_dicts = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    as_pairs = [("system", "Be brief."), ("user", "What is 2+2?")]
    reply = client.chat(as_dicts, **GREEDY)
    assert client.chat(as_pairs, **GREEDY).token_ids == reply.token_ids
    assert "".join(c.text for c in client.chat_stream(as_pairs, **GREEDY)) == reply.text
    assert reply.usage.prompt_tokens > 10 and reply.finish_reason == "length"
    started = as_pairs + [("assistant", "The answer is")]
    continued = client.chat(started, continue_final_message=True, **GREEDY)
    assert continued.usage.prompt_tokens == reply.usage.prompt_tokens + 3  # "The answer is", no turn opened


def test_a_structured_output_option_holds_the_text(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for structure in ({"json": schema}, {"json": json.dumps(schema)}):
        assert json.loads(client.generate("Answer:", structured_output=structure, max_tokens=20).text) in (
            {"ok": True}, {"ok": False})
    assert client.chat([("user", "Pick")], structured_output={"choice": ["a", "b"]}, max_tokens=4).text in ("a", "b")
    for bad in ({}, {"json": schema, "regex": "x"}, {"yaml": "x"}):
        with pytest.raises(TandemError, match="structured_output: give exactly one of json") as raised:
            client.generate("hi", structured_output=bad)
        assert raised.value.code == INVALID


def test_vllms_token_bans_truncation_and_template_variables_are_options(client):
    plain = client.generate("Hello", **GREEDY)
    allowed = sorted(set(plain.token_ids[1:3]))
    assert set(client.generate("Hello", allowed_token_ids=allowed, **GREEDY).token_ids) <= set(allowed)
    word = client.detokenize(plain.token_ids[:1])
    assert client.generate("Hello", bad_words=[word], **GREEDY).token_ids[0] != plain.token_ids[0]
    truncated = client.generate("one two three four five six", truncate_prompt_tokens=2, **GREEDY)
    assert truncated.usage.prompt_tokens == 2
    assert client.chat([("user", "Hi")], chat_template_kwargs={"enable_thinking": False}, **GREEDY).token_ids == \
        client.chat([("user", "Hi")], **GREEDY).token_ids  # the template has no such variable
    with pytest.raises(TandemError, match="chat_template_kwargs: tokenize cannot be set here"):
        client.chat([("user", "Hi")], chat_template_kwargs={"tokenize": False})
    assert client.generate("Hello", priority=-3, **GREEDY).token_ids == plain.token_ids  # scheduling_policy priority


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


def test_chat_calls_a_tool_and_carries_the_conversation_on_from_its_result(client):
    asked = [("user", "What is the weather in Paris?")]
    reply = client.chat(asked, tools=[WEATHER], tool_choice="get_weather", max_tokens=40, temperature=0.0)
    [call] = reply.tool_calls
    assert (reply.finish_reason, reply.text, call.name) == ("tool_calls", "", "get_weather")
    assert set(json.loads(call.arguments)) == {"city"}
    chunks = list(client.chat_stream(asked, tools=[WEATHER["function"]], tool_choice="required", max_tokens=60,
                                     temperature=0.0))
    assert chunks[-1].tool_calls and not any(c.tool_calls for c in chunks[:-1])
    deltas = [d for c in chunks for d in c.tool_call_deltas or ()]
    assert [(d.index, d.id, d.name) for d in deltas[:1]] == [(0, chunks[-1].tool_calls[0].id,
                                                             chunks[-1].tool_calls[0].name)]
    assert "".join(d.arguments for d in deltas) == chunks[-1].tool_calls[0].arguments and len(deltas) > 1
    result = {"role": "tool", "content": "sunny", "tool_call_id": call.id}
    openai_layout = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    follow_ups = [client.chat([{"role": "user", "content": asked[0][1]}, {"role": "assistant", "tool_calls": [c]},
                               result], **GREEDY) for c in (call, openai_layout)]
    assert follow_ups[0].token_ids == follow_ups[1].token_ids and follow_ups[0].finish_reason == "length"
    with pytest.raises(TandemError, match="tool_call_parser") as raised:  # this server reads no model's own format
        client.chat(asked, tools=[WEATHER])
    assert raised.value.code == INVALID


def test_tokenize_detokenize_models_and_health(client, model):
    ids = client.tokenize("Hello world")
    assert ids and all(isinstance(t, int) for t in ids)
    assert client.detokenize(ids) == "Hello world"
    assert client.models() == [Model(id=Path(model).name, max_model_len=1024, block_size=16)]
    assert client.health() is True and client.health("tandem.v1.Generation") is True
    with TandemClient("127.0.0.1:1", timeout=5) as nobody:
        assert nobody.health() is False


def test_embed_sync_and_async_gives_hfs_vector_and_its_usage(client, model):
    """The unified app has no prefill pool: its decode group computes the embedding."""
    ids = client.tokenize("The quick brown fox")
    embedded = client.embed("The quick brown fox")
    torch.testing.assert_close(torch.tensor(embedded.embedding), hf_embedding(model, ids), atol=2e-5, rtol=0)
    assert embedded.usage == Usage(prompt_tokens=len(ids), cached_tokens=0, completion_tokens=0)

    async def main() -> Embedding:
        async with AsyncTandemClient(URL, timeout=60) as aclient:
            return await aclient.embed(ids, dimensions=4, request_id="embed-async")

    shortened = asyncio.run(main())
    torch.testing.assert_close(torch.tensor(shortened.embedding),
                               torch.nn.functional.normalize(torch.tensor(embedded.embedding[:4]), dim=0), atol=1e-6,
                               rtol=0)
    with pytest.raises(TandemError) as raised:
        client.embed("hi", dimensions=-2**40)
    assert raised.value.code == INVALID and raised.value.details.startswith("dimensions")


# -- errors -----------------------------------------------------------------------------------------------------

def test_a_server_error_is_a_tandem_error_naming_the_field(client):
    with pytest.raises(TandemError) as raised:
        client.generate("hi", max_tokens=100_000)
    assert raised.value.code == INVALID and "max_tokens" in raised.value.details
    assert str(raised.value).startswith("INVALID_ARGUMENT: ")
    with pytest.raises(TandemError) as raised:
        list(client.chat_stream([("robot", "beep")], max_tokens=4))
    assert raised.value.code == INVALID and "role" in raised.value.details
    with pytest.raises(TandemError) as raised:
        client.tokenize("x", model="gpt-9")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND and "model" in raised.value.details


def test_values_protobuf_cannot_carry_fail_here_as_invalid_argument(client):
    for options, field in ((dict(seed=-1), "seed"), (dict(max_tokens=2**40), "max_tokens")):
        with pytest.raises(TandemError) as raised:
            client.generate("hi", **options)
        assert raised.value.code == INVALID and raised.value.details.startswith(field)
    with pytest.raises(TypeError, match="max_token"):
        client.generate("hi", max_token=3)


def test_a_passed_deadline_is_deadline_exceeded_and_frees_the_blocks(client):
    with pytest.raises(TandemError) as raised:
        client.generate(list(range(600, 660)), timeout=0.5, **LONG)
    assert raised.value.code == DEADLINE
    with TandemClient(URL, timeout=0.5) as impatient, pytest.raises(TandemError) as raised:
        impatient.generate(list(range(700, 760)), **LONG)  # the client's default deadline
    assert raised.value.code == DEADLINE
    assert_idle()


@pytest.fixture(scope="module")
def long_request_s(cluster) -> float:
    """How long a LONG request takes when left to finish: a cancelled one must free its blocks well before."""
    with TandemClient(URL, timeout=60) as client:
        started = time.monotonic()
        assert len(client.generate(list(range(800, 860)), **LONG).token_ids) == 400
        return time.monotonic() - started


def test_breaking_out_of_a_stream_cancels_the_request(client, long_request_s):
    started = time.monotonic()
    for i, _ in enumerate(client.stream(list(range(800, 860)), **LONG)):
        if i == 1:
            break
    assert_idle()
    cancelled_s = time.monotonic() - started
    assert cancelled_s < long_request_s / 2, f"idle after {cancelled_s:.2f}s; the whole request: {long_request_s:.2f}s"


# -- TLS and the API key, against a stand-in server -------------------------------------------------------------

def test_mutual_tls_from_paths_or_bytes_and_the_api_key_reach_the_server(tmp_path):
    """A plain gRPC server that requires a client certificate and answers ListModels with the authorization
    metadata it received."""
    from concurrent import futures

    from proto.tandem.v1 import tandem_pb2 as pb
    from tests.cluster.test_grpc_api import _certificates

    certs = _certificates(tmp_path)

    def list_models(request, context):
        return pb.ListModelsResponse(models=[pb.Model(id=dict(context.invocation_metadata())["authorization"])])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tandem.v1.Generation", {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            list_models, request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString)}),))
    credentials = grpc.ssl_server_credentials([(certs["server.key"].read_bytes(), certs["server.pem"].read_bytes())],
                                              root_certificates=certs["ca.pem"].read_bytes(),
                                              require_client_auth=True)
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        url = f"localhost:{port}"
        by_path = dict(root_certificates=certs["ca.pem"], private_key=str(certs["client.key"]),
                       certificate_chain=certs["client.pem"])
        by_bytes = {name: Path(path).read_bytes() for name, path in by_path.items()}
        for files in (by_path, by_bytes):
            with TandemClient(url, api_key="sesame", timeout=10, **files) as secure:
                assert [m.id for m in secure.models()] == ["Bearer sesame"]
        with TandemClient(url, root_certificates=certs["ca.pem"], timeout=10) as certificateless, \
                pytest.raises(TandemError) as raised:
            certificateless.models()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE

        async def main() -> list[Model]:
            async with AsyncTandemClient(url, api_key="sesame", timeout=10, **by_path) as secure:
                return await secure.models()

        assert [m.id for m in asyncio.run(main())] == ["Bearer sesame"]
    finally:
        server.stop(None)


@pytest.fixture
def draining_replica(model):
    """A second ingress replica, draining (as `tandem serve` leaves each replica while its calls finish on Ctrl-C):
    it refuses every new request with UNAVAILABLE. Its own event loop runs in a thread, as Serve's would."""
    ingress = Ingress(None, None, ServedModel("tiny", model, max_model_len=1024, vocab_size=49152, block_size=16,
                    hidden_size=64))
    ingress.draining = True
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = asyncio.run_coroutine_threadsafe(start_grpc_server(ingress, "127.0.0.1", port), loop).result(30)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()
    del server, ingress
    gc.collect()  # here, under the test's filter: outside Serve nothing awaits the ingress's async __del__


@pytest.mark.filterwarnings("ignore:coroutine .Ingress.__del__. was never awaited")
def test_a_refusal_from_a_draining_replica_is_tried_again_on_another(cluster, draining_replica, model):
    """The client's channel balances over both replicas (gRPC's round_robin), so every other call is refused."""
    target, balanced = f"ipv4:{draining_replica},{URL}", [("grpc.lb_policy_name", "round_robin")]
    expected = hf_greedy(model, [5, 6, 7], GREEDY["max_tokens"])
    with TandemClient(target, timeout=60, options=balanced) as retrying:
        assert [retrying.generate([5, 6, 7], **GREEDY).token_ids for _ in range(6)] == [expected] * 6
    refused = []
    with TandemClient(target, timeout=60, options=balanced, retries=0) as once:
        for _ in range(6):
            try:
                assert once.generate([5, 6, 7], **GREEDY).token_ids == expected
            except TandemError as e:
                refused.append(e)
    assert refused and all(e.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details for e in refused)
    with pytest.raises(ValueError, match="retries"):
        TandemClient(URL, retries=5)


# -- the asyncio client -----------------------------------------------------------------------------------------

def test_the_async_client_generates_streams_and_cancels_the_same(client, long_request_s):
    prompt = "The quick brown fox jumps over the lazy dog"
    expected = client.generate(prompt, **GREEDY)

    async def main() -> tuple[Completion, str, bool, TandemError, float]:
        async with AsyncTandemClient(URL, timeout=60) as aclient:
            completion = await aclient.generate(prompt, **GREEDY)
            streamed = "".join([c.text async for c in aclient.stream(prompt, **GREEDY)])
            healthy = await aclient.health()
            try:
                await aclient.generate("hi", max_tokens=100_000)
            except TandemError as e:
                error = e
            started = time.monotonic()
            async for i, _ in _aenumerate(aclient.stream(list(range(900, 960)), **LONG)):
                if i == 1:
                    break
            return completion, streamed, healthy, error, started

    completion, streamed, healthy, error, started = asyncio.run(main())
    assert completion.token_ids == expected.token_ids and completion.text == expected.text == streamed
    assert completion.usage == expected.usage and healthy
    assert error.code == INVALID and "max_tokens" in error.details
    assert_idle()
    assert time.monotonic() - started < long_request_s / 2


async def _aenumerate(items):
    i = 0
    async for item in items:
        yield i, item
        i += 1


# -- the command line -------------------------------------------------------------------------------------------

def tandem(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_generate_with_url_prints_the_clusters_completion(client):
    prompt = "Once upon a time"
    out = tandem("generate", "--url", URL, "--prompt", prompt, "--max-tokens", "5", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = client.generate(prompt, max_tokens=5, temperature=0)
    assert (result["text"], result["token_ids"]) == (expected.text, expected.token_ids)
    assert result["finish_reason"] == expected.finish_reason
    assert result["usage"]["generated_tokens"] == len(result["token_ids"]) and result["ttft_s"] > 0
    streamed = tandem("generate", "--url", URL, "--prompt", prompt, "--max-tokens", "5", "--temperature", "0")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected.text + "\n"


def test_cli_structured_output_flags_reach_the_cluster(client, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"]}')
    out = tandem("generate", "--url", URL, "--prompt", "Count:", "--max-tokens", "20", "--json-schema", str(schema))
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout)) == ["n"]
    out = tandem("generate", "--url", URL, "--prompt", "Go", "--choice", "up", "--choice", "down", "--json")
    assert json.loads(out.stdout)["text"] in ("up", "down")
    out = tandem("generate", "--url", URL, "--prompt", "Go", "--regex", "a(b")
    assert out.returncode == 1 and "structured_output: regex" in out.stderr
    out = tandem("generate", "--url", URL, "--prompt", "Go", "--bad-word", " ", "--truncate-prompt-tokens", "1")
    assert out.returncode == 1 and "bad_words: must be words" in out.stderr


def test_cli_chat_with_url_keeps_the_conversation(client):
    first, second = "Hello there", "And then?"
    out = tandem("chat", "--url", URL, "--system", "Be brief.", "--max-tokens", "6", "--ignore-eos",
                 stdin=f"{first}\n{second}\n")
    assert out.returncode == 0, out.stderr
    options = dict(max_tokens=6, temperature=0, ignore_eos=True)
    reply1 = client.chat([("system", "Be brief."), ("user", first)], **options).text
    reply2 = client.chat([("system", "Be brief."), ("user", first), ("assistant", reply1), ("user", second)],
                         **options).text
    assert out.stdout == f"{reply1}\n{reply2}\n"
    one = tandem("generate", "--url", URL, "--chat", "--system", "Be brief.", "--prompt", first, "--max-tokens",
                 "6", "--ignore-eos", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["text"] == reply1


def test_cli_reports_a_server_error_without_a_traceback(cluster):
    out = tandem("generate", "--url", URL, "--prompt", "hi", "--max-tokens", "100000")
    assert out.returncode == 1
    assert out.stderr.startswith("tandem: INVALID_ARGUMENT: ") and "max_tokens" in out.stderr
    assert "Traceback" not in out.stderr
