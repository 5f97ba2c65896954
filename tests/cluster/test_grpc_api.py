"""The gRPC API end to end: a real Serve app (a prefill and a decode group on a tiny random Llama), a real gRPC
server inside the ingress and real clients over a socket. Every RPC answers; streamed deltas make up the whole
completion, which equals the engine's own offline output; every bad input gets its documented status and leaves
the server healthy with no block leaked; cancelling or letting the deadline pass frees the blocks on both
pools; and a second, secured app checks TLS, the API key and back-pressure."""

import asyncio
import datetime
import json
import re
import time
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig, PoolConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc
from router.api_config import ApiConfig
from tests.hf_reference import hf_embedding
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams, StructuredOutput

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

PORT, SECURE_PORT = 16051, 16052
APP, SECURE_APP = "tandem-grpc", "tandem-grpc-secure"
VOCAB, CONTEXT = 49152, 1024
GREEDY = pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def cluster(model, redis_url):
    config = ClusterConfig(model=model, num_kv_blocks=128, num_cpus_per_rank=0.5, kv_transfer_timeout_s=10,
                           redis_url=redis_url, grpc_port=PORT, api=ApiConfig(max_tokens=512, max_stop_strings=4,
                                                                               reasoning_parser="qwen3",
                                                                               tool_call_parser="hermes"))
    serve.run(build_app(config), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


@pytest.fixture(scope="module")
def stub(cluster):
    """One channel for the module, as a service keeps one: closing a channel takes 0.2 s."""
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield tandem_pb2_grpc.GenerationStub(channel)


def pool(name: str, app: str = APP):
    return serve.get_deployment_handle(name, app_name=app)


async def idle_pools(app: str = APP, names=("prefill", "decode"), timeout_s: float = 20.0):
    """Both pools' stats once nothing runs and every block is free (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [await pool(name, app).stats.remote() for name in names]
        if all(s.num_free_blocks == s.num_blocks and s.num_running + s.num_waiting + s.num_pinned
               + s.num_receiving == 0 for s in stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


def assert_no_blocks_held(app: str = APP, names=("prefill", "decode")):
    for stats in asyncio.run(idle_pools(app, names)):
        assert (stats.num_running, stats.num_waiting, stats.num_pinned, stats.num_receiving) == (0, 0, 0, 0)
        assert stats.num_free_blocks == stats.num_blocks


def generate(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))


# -- every RPC ------------------------------------------------------------------------------------------------

def test_generate_streams_deltas_that_make_up_the_engines_offline_completion(stub, model):
    prompt = "The quick brown fox jumps over the lazy dog"
    responses = generate(stub, text=prompt, sampling=GREEDY)
    offline = LLM(model, progress=False, num_kv_blocks=64).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert [t for r in responses for t in r.token_ids] == offline.token_ids
    assert "".join(r.text for r in responses) == offline.text
    assert len(responses) > 1 and all(not r.finish_reason for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == "length" and last.request_id == responses[0].request_id
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(stub.Tokenize(
        pb.TokenizeRequest(text=prompt)).token_ids)


def test_penalties_and_logit_bias_give_the_engines_offline_completion(stub, model):
    """The first token is chosen on the prefill group, the rest on the decode group: both see the prompt and
    what was generated, as the offline engine does."""
    prompt = "one two one two one two one two"
    # The random model's logits lie within +-7: a bias of 30 makes token 1234 win, until the penalties of its
    # repetitions (/ 1.5, - 2, - 2 per time generated) have pulled it below the rest.
    fields = dict(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=2.0,
                  presence_penalty=2.0, logit_bias={1234: 30.0})
    responses = generate(stub, text=prompt, sampling=pb.SamplingParams(**fields))
    offline = LLM(model, progress=False, num_kv_blocks=64).generate([prompt], SamplingParams(**fields))[0].outputs[0]
    assert [t for r in responses for t in r.token_ids] == offline.token_ids
    repeats = offline.token_ids.index(next(t for t in offline.token_ids if t != 1234))
    assert 1 < repeats < 12 and offline.token_ids[:repeats] == [1234] * repeats


def test_min_tokens_and_min_p_give_the_engines_offline_completion(stub, model):
    """min_tokens holds the stop token back on both groups: from the first token, which the prefill group picks,
    to the rest, which the decode group does. A seeded min_p sample is the offline one too."""
    prompt = "one two three four five"
    llm = LLM(model, progress=False, num_kv_blocks=64)
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    first = plain.token_ids[0]
    held = dict(max_tokens=12, temperature=0.0, ignore_eos=True, min_tokens=4, stop_token_ids=[first])
    sampled = dict(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True, min_p=0.2)
    for fields in (held, sampled):
        responses = generate(stub, text=prompt, sampling=pb.SamplingParams(**fields))
        offline = llm.generate([prompt], SamplingParams(**fields))[0].outputs[0]
        assert [t for r in responses for t in r.token_ids] == offline.token_ids
        if fields is held:
            assert len(offline.token_ids) > 4 and first not in offline.token_ids[:4]


def test_prompt_logprobs_come_on_the_first_response_past_the_prefix_cache(stub, model):
    """The decode group computes such a prompt itself (only the group that computes it has the logits): the same
    logprobs as the offline engine, the same tokens, and nothing taken from the cache a repeat would hit."""
    ids = [(7 * i + 3) % VOCAB for i in range(40)]
    params = dict(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    generate(stub, token_ids=pb.TokenIds(ids=ids), sampling=GREEDY)  # cached now on a group
    responses = generate(stub, token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**params))
    offline = LLM(model, progress=False, num_kv_blocks=64).generate(ids, SamplingParams(**params))[0]
    got = [dict(entry.logprobs) for entry in responses[0].prompt_logprobs]
    assert len(got) == len(ids) - 1 and all(not r.prompt_logprobs for r in responses[1:])
    for entry, expected in zip(got, offline.prompt_logprobs[1:]):
        assert entry.keys() == expected.keys()
        assert all(entry[t] == pytest.approx(expected[t], abs=1e-4) for t in entry)
    assert [t for r in responses for t in r.token_ids] == offline.outputs[0].token_ids
    assert responses[-1].usage.cached_tokens == 0


def test_a_structured_output_holds_across_both_groups_as_offline(stub, model):
    """The prefill group picks the first token under the grammar, the decode group the rest after it: the offline
    engine's tokens, sampled or greedy, in a text that matches."""
    email = "[a-z]{2,6}@[a-z]{3,5}[.](com|org)"
    llm = LLM(model, progress=False, num_kv_blocks=64)
    for structure, sampled in ((dict(regex=email), dict(max_tokens=40, temperature=1.0, seed=5)),
                               (dict(choice=("north", "south", "east")), dict(max_tokens=8, temperature=0.0))):
        message = pb.StructuredOutput(**{k: pb.Choices(choices=v) if k == "choice" else v
                                         for k, v in structure.items()})
        responses = generate(stub, text="Write to", sampling=pb.SamplingParams(structured_output=message, **sampled))
        offline = llm.generate(["Write to"], SamplingParams(structured_output=StructuredOutput(**structure),
                                                            **sampled))[0].outputs[0]
        assert [t for r in responses for t in r.token_ids] == offline.token_ids
        text = "".join(r.text for r in responses)
        assert responses[-1].finish_reason == "stop"
        assert re.fullmatch(email, text) if "regex" in structure else text in structure["choice"]


def test_allowed_tokens_bad_words_and_truncation_give_the_engines_offline_completion(stub, model):
    """The prefill group picks the first token under the bans, the decode group the rest; a truncated prompt is its
    last tokens on both."""
    prompt = "one two three four five six seven eight nine ten"
    llm = LLM(model, progress=False, num_kv_blocks=64)
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    word = next(text for text in map(llm.tokenizer.decode, ([t] for t in plain.token_ids)) if text.startswith(" "))
    for fields in (dict(allowed_token_ids=[5, 1234, 4321]), dict(bad_words=[word]), dict(truncate_prompt_tokens=4)):
        fields |= dict(max_tokens=12, temperature=0.0, ignore_eos=True)
        responses = generate(stub, text=prompt, sampling=pb.SamplingParams(**fields))
        offline = llm.generate([prompt], SamplingParams(**fields))[0]
        assert [t for r in responses for t in r.token_ids] == offline.outputs[0].token_ids != plain.token_ids
        assert responses[-1].usage.prompt_tokens == len(offline.prompt_token_ids)
    assert len(offline.prompt_token_ids) == 4


def test_special_tokens_come_back_in_the_text_only_when_asked(stub):
    fields = dict(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={1: 100.0})  # 1: <|im_start|>
    skipped = generate(stub, text="hi", sampling=pb.SamplingParams(**fields))
    kept = generate(stub, text="hi", sampling=pb.SamplingParams(skip_special_tokens=False, **fields))
    assert [t for r in kept for t in r.token_ids] == [t for r in skipped for t in r.token_ids] == [1, 1, 1]
    assert "".join(r.text for r in skipped) == "" and "".join(r.text for r in kept) == "<|im_start|>" * 3


def test_a_chat_reply_can_continue_the_last_message(stub, model):
    from transformers import AutoTokenizer

    messages = [("user", "What is the capital of France?"), ("assistant", "The capital of France is")]
    rendered = AutoTokenizer.from_pretrained(model).apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], continue_final_message=True, tokenize=True,
        return_dict=False)
    chat = pb.ChatRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], sampling=GREEDY,
                          continue_final_message=True)
    continued = list(stub.Chat(chat, timeout=60))
    as_ids = generate(stub, token_ids=pb.TokenIds(ids=list(rendered)), sampling=GREEDY)
    assert [t for r in continued for t in r.token_ids] == [t for r in as_ids for t in r.token_ids]
    assert continued[-1].usage.prompt_tokens == len(rendered)


def test_a_chat_reply_that_thinks_streams_its_thinking_apart_from_its_answer(stub):
    """With the cluster's reasoning parser (qwen3), across the prefill->decode handoff; the format is forced on the
    random model by a regex. Generate has no turn to think in: its text is the model's, tags and all."""
    thinking, answer = "The user asks for a capital.", "It is Paris."
    sampling = pb.SamplingParams(max_tokens=60, temperature=0.0, structured_output=pb.StructuredOutput(
        regex=re.escape(f"<think>{thinking}</think>{answer}")))
    messages = [pb.ChatMessage(role="user", content="What is the capital of France?")]
    chat = list(stub.Chat(pb.ChatRequest(messages=messages, sampling=sampling), timeout=60))
    assert ("".join(r.reasoning_text for r in chat), "".join(r.text for r in chat)) == (thinking, answer)
    assert chat[-1].finish_reason == "stop"
    raw = generate(stub, text="What is the capital of France?", sampling=sampling)
    assert ("".join(r.reasoning_text for r in raw), "".join(r.text for r in raw)) == (
        "", f"<think>{thinking}</think>{answer}")


WEATHER = pb.Tool(name="get_weather", description="The weather in a city.", parameters={
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
    "additionalProperties": False})
CLOCK = pb.Tool(name="get_time", parameters={"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                             "required": ["zone"], "additionalProperties": False})
ASK = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]


def chat(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Chat(pb.ChatRequest(**fields), timeout=60))


def streamed_calls(responses: list[pb.GenerateResponse]) -> list[tuple[str, str, str, int]]:
    """Each call put together from the responses' tool_call_deltas: (id, name, arguments, how many deltas)."""
    calls: dict[int, list] = {}
    for delta in (d for r in responses for d in r.tool_call_deltas):
        call = calls.setdefault(delta.index, ["", "", "", 0])
        call[0], call[1] = call[0] + delta.id, call[1] + delta.name
        call[2], call[3] = call[2] + delta.arguments, call[3] + 1
    return [tuple(calls[i]) for i in sorted(calls)]


def test_a_forced_tool_call_streams_and_comes_whole_on_the_last_response_held_to_the_tools_schema(stub):
    """Across the prefill->decode handoff: the random model's reply is held to the schema, so its arguments parse
    and validate; the text is the reply's alone, which a forced call has none of. The call's deltas add up to
    it."""
    named = chat(stub, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=pb.ToolChoice(function="get_weather"),
                 sampling=pb.SamplingParams(max_tokens=40, temperature=0.0))
    [call] = named[-1].tool_calls
    assert (named[-1].finish_reason, call.name, call.id.startswith("call_")) == ("tool_calls", "get_weather", True)
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city"} and len(arguments["city"]) <= 12
    assert not any(r.text or r.tool_calls for r in named[:-1]) and not named[-1].text
    [(call_id, name, streamed, deltas)] = streamed_calls(named)
    assert (call_id, name, streamed) == (call.id, call.name, call.arguments) and deltas > 1
    required = chat(stub, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=pb.ToolChoice(mode="required"),
                    parallel_tool_calls=False, sampling=pb.SamplingParams(max_tokens=60, temperature=0.0))
    [call] = required[-1].tool_calls
    assert call.name in ("get_weather", "get_time") and required[-1].finish_reason == "tool_calls"
    assert set(json.loads(call.arguments)) == {"city" if call.name == "get_weather" else "zone"}


# What a Hermes-format model (Qwen2.5) says when it calls a tool, forced here on the random model by a regex.
HERMES_REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_auto_tool_choice_streams_the_text_and_finds_the_models_own_calls(stub):
    """The cluster's parser (api.tool_call_parser hermes): no part of a call's markup streams as text, the calls
    stream as deltas and come whole on the last response. Its result goes back as a tool message after the
    assistant's call."""
    sampling = pb.SamplingParams(max_tokens=80, temperature=0.0, structured_output=pb.StructuredOutput(
        regex=re.escape(HERMES_REPLY)))
    responses = chat(stub, messages=ASK, tools=[WEATHER], sampling=sampling)
    assert "".join(r.text for r in responses) == "Let me check.\n"
    assert all("<" not in r.text for r in responses) and responses[-1].finish_reason == "tool_calls"
    [call] = responses[-1].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    [(call_id, name, streamed, deltas)] = streamed_calls(responses)
    assert (call_id, name, streamed) == (call.id, call.name, call.arguments) and deltas > 1
    follow_up = [*ASK, pb.ChatMessage(role="assistant", content="Let me check.\n", tool_calls=[call]),
                 pb.ChatMessage(role="tool", content="sunny", tool_call_id=call.id)]
    answer = chat(stub, messages=follow_up, tools=[WEATHER], tool_choice=pb.ToolChoice(mode="none"),
                  sampling=GREEDY)
    assert answer[-1].finish_reason == "length" and "".join(r.text for r in answer)
    assert not answer[-1].tool_calls


def test_the_first_response_carries_the_time_to_first_token_breakdown(stub):
    ttft = generate(stub, token_ids=pb.TokenIds(ids=list(range(300, 400))), sampling=GREEDY)[0].ttft
    stages = [ttft.router_queue_s, ttft.prefill_queue_s, ttft.prefill_compute_s, ttft.kv_transfer_s,
              ttft.first_decode_step_s]
    assert all(s >= 0 for s in stages) and ttft.prefill_compute_s > 0 and ttft.total_s > 0
    assert sum(stages) == pytest.approx(ttft.total_s, rel=1e-6)
    # 100 prompt tokens = 6 full blocks and a partial one moved from the prefill group to the decode group.
    assert ttft.kv_transfer_s > 0 and ttft.kv_transfer_bytes > 0


def test_a_repeated_prompt_reports_cached_tokens(stub):
    ids = pb.TokenIds(ids=[(11 * i) % VOCAB for i in range(80)])
    first = generate(stub, token_ids=ids, sampling=GREEDY)[-1].usage
    second = generate(stub, token_ids=ids, sampling=GREEDY)[-1].usage
    assert first.prompt_tokens == second.prompt_tokens == 80
    assert second.cached_tokens >= 64 > first.cached_tokens


def test_chat_renders_the_template_and_salted_requests_share_nothing(stub):
    messages = [pb.ChatMessage(role="user", content="What is the capital of France?")]
    plain = list(stub.Chat(pb.ChatRequest(messages=messages, sampling=GREEDY), timeout=60))
    salted = list(stub.Chat(pb.ChatRequest(messages=messages, sampling=GREEDY, cache_salt="tenant-b"), timeout=60))
    assert "".join(r.text for r in plain) == "".join(r.text for r in salted)
    assert plain[-1].usage.prompt_tokens > 10 and salted[-1].usage.cached_tokens == 0


def test_stop_strings_logprobs_and_request_ids_come_back(stub):
    free = "".join(r.text for r in generate(stub, text="a b c", sampling=GREEDY))
    stop = free[3:6]
    responses = generate(stub, text="a b c", request_id="mine-1", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop], logprobs=2))
    assert {r.request_id for r in responses} == {"mine-1"}
    assert responses[-1].finish_reason == "stop" and responses[-1].stop_string == stop
    assert "".join(r.text for r in responses) == free[:free.index(stop)]
    assert all(len(r.logprobs) == len(r.token_ids) for r in responses)
    assert all(2 <= len(entry.logprobs) <= 3 for r in responses for entry in r.logprobs)


def test_tokenize_detokenize_and_list_models(stub, model):
    ids = stub.Tokenize(pb.TokenizeRequest(text="Hello world")).token_ids
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "Hello world"
    [served] = stub.ListModels(pb.ListModelsRequest()).models
    assert (served.id, served.max_model_len, served.block_size) == (Path(model).name, CONTEXT, 16)
    assert stub.Tokenize(pb.TokenizeRequest(model=served.id, text="x")).token_ids


def test_embed_gives_hfs_normalized_last_hidden_state_and_shares_the_prefix_cache(stub, model):
    ids = [(53 * j + 11) % VOCAB for j in range(40)]  # no other test's prompt: nothing of it is cached yet
    expected = hf_embedding(model, ids)
    first = stub.Embed(pb.EmbedRequest(token_ids=pb.TokenIds(ids=ids)), timeout=60)
    torch.testing.assert_close(torch.tensor(first.embedding), expected, atol=2e-5, rtol=0)
    assert (first.usage.prompt_tokens, first.usage.cached_tokens, first.usage.completion_tokens) == (40, 0, 0)
    shorter = stub.Embed(pb.EmbedRequest(token_ids=pb.TokenIds(ids=ids), dimensions=8), timeout=60)
    torch.testing.assert_close(torch.tensor(shorter.embedding), torch.nn.functional.normalize(expected[:8], dim=0),
                               atol=2e-5, rtol=0)
    assert shorter.usage.cached_tokens == 32  # the prompt's two full blocks, left cached by the first
    text = stub.Embed(pb.EmbedRequest(text="Hello world"), timeout=60)
    words = stub.Tokenize(pb.TokenizeRequest(text="Hello world")).token_ids
    torch.testing.assert_close(torch.tensor(text.embedding), hf_embedding(model, list(words)), atol=2e-5, rtol=0)


def test_health_and_reflection_are_served(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tandem.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in answer.list_services_response.service}
        assert {"tandem.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                "grpc.reflection.v1.ServerReflection"} <= names
        # grpc.reflection.v1 too, which newer clients try first: the same messages on the wire as v1alpha.
        reflect_v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                           request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                           response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [answer] = reflect_v1(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="tandem.v1.Generation")]), timeout=10)
        files = answer.file_descriptor_response.file_descriptor_proto
        assert files and any(b"tandem.v1" in f for f in files)
        # Every service listed can be described, v1 reflection itself included.
        for name in names:
            [answer] = reflect_v1(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)]),
                                  timeout=10)
            described = [descriptor_pb2.FileDescriptorProto.FromString(f)
                         for f in answer.file_descriptor_response.file_descriptor_proto]
            assert any(name == f"{f.package}.{s.name}" for f in described for s in f.service), name
        # A client builds the messages from the files reflection sends, each after those it imports.
        pool = descriptor_pool.DescriptorPool()

        def add(filename: str) -> None:
            [answer] = reflect_v1(iter([reflection_pb2.ServerReflectionRequest(file_by_filename=filename)]),
                                  timeout=10)
            file = descriptor_pb2.FileDescriptorProto.FromString(
                answer.file_descriptor_response.file_descriptor_proto[0])
            for dependency in file.dependency:
                add(dependency)
            pool.Add(file)

        add("proto/tandem/v1/tandem.proto")
        chat = pool.FindMessageTypeByName("tandem.v1.ChatRequest")
        assert chat.fields_by_name["chat_template_kwargs"].message_type.full_name == "google.protobuf.Struct"


# -- bad input ------------------------------------------------------------------------------------------------

INVALID, NOT_FOUND, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, \
    grpc.StatusCode.RESOURCE_EXHAUSTED


def sampling(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**{"max_tokens": 4, **fields})


BAD_GENERATE = {
    "no prompt": (dict(sampling=sampling()), INVALID, "prompt"),
    "empty prompt": (dict(text=""), INVALID, "prompt"),
    "empty token ids": (dict(token_ids=pb.TokenIds(ids=[])), INVALID, "token_ids"),
    "token id -1": (dict(token_ids=pb.TokenIds(ids=[5, -1])), INVALID, "token_ids"),
    "token id = vocab": (dict(token_ids=pb.TokenIds(ids=[VOCAB])), INVALID, "token_ids"),
    "prompt at the context": (dict(token_ids=pb.TokenIds(ids=[7] * CONTEXT)), INVALID, "prompt"),
    "prompt over the context by one": (dict(token_ids=pb.TokenIds(ids=[7] * (CONTEXT + 1))), INVALID, "prompt"),
    "max_tokens 0": (dict(text="hi", sampling=sampling(max_tokens=0)), INVALID, "max_tokens"),
    "max_tokens -1": (dict(text="hi", sampling=sampling(max_tokens=-1)), INVALID, "max_tokens"),
    "max_tokens 10^9": (dict(text="hi", sampling=sampling(max_tokens=10**9)), INVALID, "max_tokens"),
    "max_tokens over the cap": (dict(text="hi", sampling=sampling(max_tokens=513)), INVALID, "max_tokens"),
    "temperature -1": (dict(text="hi", sampling=sampling(temperature=-1)), INVALID, "temperature"),
    "temperature NaN": (dict(text="hi", sampling=sampling(temperature=float("nan"))), INVALID, "temperature"),
    "temperature inf": (dict(text="hi", sampling=sampling(temperature=float("inf"))), INVALID, "temperature"),
    "top_p 0": (dict(text="hi", sampling=sampling(top_p=0)), INVALID, "top_p"),
    "top_p 1.5": (dict(text="hi", sampling=sampling(top_p=1.5)), INVALID, "top_p"),
    "top_p NaN": (dict(text="hi", sampling=sampling(top_p=float("nan"))), INVALID, "top_p"),
    "top_k -2": (dict(text="hi", sampling=sampling(top_k=-2)), INVALID, "top_k"),
    "logprobs -1": (dict(text="hi", sampling=sampling(logprobs=-1)), INVALID, "logprobs"),
    "logprobs 21": (dict(text="hi", sampling=sampling(logprobs=21)), INVALID, "logprobs"),
    "empty stop string": (dict(text="hi", sampling=sampling(stop=[""])), INVALID, "stop"),
    "too many stop strings": (dict(text="hi", sampling=sampling(stop=["x"] * 5)), INVALID, "stop"),
    "10^4 stop strings": (dict(text="hi", sampling=sampling(stop=[f"s{i}" for i in range(10**4)])), INVALID,
                          "stop"),
    "stop token -1": (dict(text="hi", sampling=sampling(stop_token_ids=[-1])), INVALID, "stop_token_ids"),
    "stop token = vocab": (dict(text="hi", sampling=sampling(stop_token_ids=[VOCAB])), INVALID, "stop_token_ids"),
    "presence_penalty 3": (dict(text="hi", sampling=sampling(presence_penalty=3)), INVALID, "presence_penalty"),
    "frequency_penalty NaN": (dict(text="hi", sampling=sampling(frequency_penalty=float("nan"))), INVALID,
                              "frequency_penalty"),
    "repetition_penalty 0": (dict(text="hi", sampling=sampling(repetition_penalty=0)), INVALID, "repetition_penalty"),
    "logit_bias 101": (dict(text="hi", sampling=sampling(logit_bias={5: 101})), INVALID, "logit_bias"),
    "min_p 1.5": (dict(text="hi", sampling=sampling(min_p=1.5)), INVALID, "min_p"),
    "min_tokens > max_tokens": (dict(text="hi", sampling=sampling(min_tokens=5)), INVALID, "min_tokens"),
    "regex that does not parse": (dict(text="hi", sampling=sampling(structured_output=pb.StructuredOutput(
        regex="a(b"))), INVALID, "structured_output: regex: Regex parsing error"),
    "JSON schema that is not JSON": (dict(text="hi", sampling=sampling(structured_output=pb.StructuredOutput(
        json="{type"))), INVALID, "structured_output: json"),
    "structured output of no kind": (dict(text="hi", sampling=sampling(structured_output=pb.StructuredOutput())),
                                     INVALID, "structured_output: give exactly one"),
    "structured output ignoring EOS": (dict(text="hi", sampling=sampling(
        ignore_eos=True, structured_output=pb.StructuredOutput(json_object=True))), INVALID, "ignore_eos"),
    "allowed token = vocab": (dict(text="hi", sampling=sampling(allowed_token_ids=[VOCAB])), INVALID,
                              "allowed_token_ids"),
    "blank bad word": (dict(text="hi", sampling=sampling(bad_words=[" "])), INVALID, "bad_words"),
    "too many bad words": (dict(text="hi", sampling=sampling(bad_words=[f"w{i}" for i in range(257)])), INVALID,
                           "bad_words: at most 256 words"),
    "truncate_prompt_tokens 0": (dict(text="hi", sampling=sampling(truncate_prompt_tokens=0)), INVALID,
                                 "truncate_prompt_tokens"),
    "a priority on a server that runs requests in arrival order": (dict(text="hi", sampling=sampling(priority=1)),
                                                                   INVALID, "priority: this server runs requests"),
    "structured output with bad words": (dict(text="hi", sampling=sampling(
        bad_words=["x"], structured_output=pb.StructuredOutput(json_object=True))), INVALID, "bad_words"),
    "logit_bias token -1": (dict(text="hi", sampling=sampling(logit_bias={-1: 1})), INVALID, "logit_bias"),
    "logit_bias token = vocab": (dict(text="hi", sampling=sampling(logit_bias={VOCAB: 1})), INVALID, "logit_bias"),
    "oversized cache_salt": (dict(text="hi", cache_salt="s" * 257), INVALID, "cache_salt"),
    "unknown model": (dict(text="hi", model="gpt-9"), NOT_FOUND, "model"),
    "10 MB prompt": (dict(text="x" * 10_000_000), EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE), ids=list(BAD_GENERATE))
def test_bad_generate_requests_get_their_documented_status(stub, case):
    fields, code, mentions = BAD_GENERATE[case]
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, **fields)
    assert raised.value.code() == code, raised.value.details()
    # As a whole word: an error names the field as tandem.v1 spells it ("token_ids", not "prompt_token_ids").
    assert re.search(rf"\b{re.escape(mentions)}", raised.value.details()), raised.value.details()


def test_a_refusal_from_inside_a_worker_group_reads_as_cleanly_as_the_ingresss(stub):
    """Only the engine knows the tokens that end a request; its refusal crosses Ray without the traceback."""
    with pytest.raises(grpc.RpcError) as raised:
        generate(stub, text="hi", sampling=sampling(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=1))
    assert raised.value.code() == INVALID
    assert raised.value.details() == ("allowed_token_ids: allows only tokens that end the request, which min_tokens "
                                      "holds back")


BAD_OTHER = {
    "chat without messages": ("Chat", pb.ChatRequest(sampling=sampling()), INVALID, "messages"),
    "chat with an unknown role": ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]),
                                  INVALID, "role"),
    "chat for an unknown model": ("Chat", pb.ChatRequest(model="nope", messages=[pb.ChatMessage(
        role="user", content="x")]), NOT_FOUND, "model"),
    "chat template kwargs that set a parameter": ("Chat", pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="x")], chat_template_kwargs={"tokenize": False}), INVALID,
        "chat_template_kwargs: tokenize cannot be set here"),
    "tool_choice naming no tool of the request": ("Chat", pb.ChatRequest(messages=ASK, tools=[WEATHER],
                                                                        tool_choice=pb.ToolChoice(function="x")),
                                                  INVALID, "tool_choice: names 'x'"),
    "tool_choice required without tools": ("Chat", pb.ChatRequest(messages=ASK, tool_choice=pb.ToolChoice(
        mode="required")), INVALID, "tool_choice"),
    "tool_choice of an unknown mode": ("Chat", pb.ChatRequest(messages=ASK, tools=[WEATHER], tool_choice=pb.ToolChoice(
        mode="any")), INVALID, "tool_choice: must be"),
    "a tool without a name": ("Chat", pb.ChatRequest(messages=ASK, tools=[pb.Tool()]), INVALID, "tools[0].name"),
    "a forced tool call ignoring EOS": ("Chat", pb.ChatRequest(messages=ASK, tools=[WEATHER], tool_choice=pb.ToolChoice(
        function="get_weather"), sampling=sampling(ignore_eos=True)), INVALID, "tools: cannot be combined with "
                                                                              "ignore_eos"),
    "a forced tool call and a structured output": ("Chat", pb.ChatRequest(
        messages=ASK, tools=[WEATHER], tool_choice=pb.ToolChoice(mode="required"),
        sampling=sampling(structured_output=pb.StructuredOutput(json_object=True))), INVALID, "tool_choice"),
    "embed without a prompt": ("Embed", pb.EmbedRequest(), INVALID, "prompt: give text or token_ids"),
    "embed a prompt longer than the context": ("Embed", pb.EmbedRequest(token_ids=pb.TokenIds(ids=[5] * (CONTEXT + 1))),
                                               INVALID, f"prompt: {CONTEXT + 1} tokens exceed the model's context"),
    "embed with more dimensions than the model has": ("Embed", pb.EmbedRequest(text="x", dimensions=65), INVALID,
                                                      "dimensions: must be in [1, 64]"),
    "embed for an unknown model": ("Embed", pb.EmbedRequest(model="nope", text="x"), NOT_FOUND, "model"),
    "classify on a model without a classification head": ("Classify", pb.ClassifyRequest(text="x"), INVALID,
                                                           "model: "),
    "detokenize id = vocab": ("Detokenize", pb.DetokenizeRequest(token_ids=[VOCAB]), INVALID, "token_ids"),
    "tokenize for an unknown model": ("Tokenize", pb.TokenizeRequest(model="nope", text="x"), NOT_FOUND, "model"),
}


@pytest.mark.parametrize("case", list(BAD_OTHER), ids=list(BAD_OTHER))
def test_bad_requests_to_the_other_rpcs_get_their_documented_status(stub, case):
    method, request, code, mentions = BAD_OTHER[case]
    with pytest.raises(grpc.RpcError) as raised:
        call = getattr(stub, method)(request, timeout=30)
        list(call) if method == "Chat" else call
    assert raised.value.code() == code, raised.value.details()
    assert mentions in raised.value.details()


def raw_generate(channel: grpc.Channel, payload: bytes) -> grpc.RpcError:
    call = channel.unary_stream("/tandem.v1.Generation/Generate", request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as raised:
        list(call(payload, timeout=30))
    return raised.value


def test_undecodable_bytes_and_unknown_fields_are_invalid_arguments_not_internal_errors(cluster):
    valid = pb.GenerateRequest(text="hi", sampling=sampling()).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        bad_utf8 = raw_generate(channel, bytes([0x12, 0x02, 0xff, 0xfe]))  # field 2 (text): invalid UTF-8
        unknown = raw_generate(channel, valid + bytes([0xa0, 0x06, 0x01]))  # field 100: not in tandem.v1
        unknown_nested = raw_generate(channel, pb.GenerateRequest(text="hi").SerializeToString()
                                      + bytes([0x22, 0x03, 0xa0, 0x06, 0x01]))  # sampling.#100
    assert bad_utf8.code() == INVALID and "UTF-8" in bad_utf8.details()
    assert unknown.code() == INVALID and "#100" in unknown.details()
    assert unknown_nested.code() == INVALID and "sampling.#100" in unknown_nested.details()


@pytest.mark.parametrize("method", [m.name for m in pb.DESCRIPTOR.services_by_name["Generation"].methods
                                    if not m.server_streaming])
def test_every_unary_rpc_refuses_a_field_tandem_v1_does_not_define(cluster, method):
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        call = channel.unary_unary(f"/tandem.v1.Generation/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as refused:
            call(bytes([0xa0, 0x06, 0x01]), timeout=30)  # field 100
    assert refused.value.code() == INVALID and "#100" in refused.value.details()


def test_after_the_bad_input_the_server_is_healthy_and_no_block_is_leaked(stub):
    """Runs after the corpus above (tests run in file order)."""
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert generate(stub, text="a probe", sampling=GREEDY)[-1].finish_reason == "length"
    assert_no_blocks_held()


# -- cancellation and deadlines -------------------------------------------------------------------------------

LONG = pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def test_cancelling_mid_stream_frees_every_block_on_both_pools(stub):
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(500, 560))), sampling=LONG),
                         timeout=60)
    next(call)
    next(call)  # decoding on the decode group, the KV moved
    call.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert_no_blocks_held()


def test_a_passed_deadline_aborts_the_request_and_frees_its_blocks(stub):
    """The deadline passes while the request decodes: 512 tokens take the tiny model about 2 s on an idle machine
    (it streamed 400 within 1.5 s once), the deadline is 1 s."""
    longest = pb.SamplingParams(max_tokens=512, temperature=0.0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(600, 660))), sampling=longest),
                         timeout=1.0)
    next(call)  # decoding
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_blocks_held()


# -- the secured app: TLS with client certificates, an API key, back-pressure ---------------------------------

def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_key=None, issuer_name=None, ca: bool = False, san: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = issue("tandem-test-ca", ca=True)
    files = {}
    for name, (key, cert) in {"ca": (ca_key, ca_cert),
                              "server": issue("localhost", ca_key, ca_cert.subject, san=True),
                              "client": issue("client", ca_key, ca_cert.subject)}.items():
        files[f"{name}.key"] = folder / f"{name}.key"
        files[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{name}.pem"] = folder / f"{name}.pem"
        files[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.fixture(scope="module")
def secured(model, redis_url, tmp_path_factory):
    certs = _certificates(tmp_path_factory.mktemp("certs"))
    api = ApiConfig(api_key="sesame", max_concurrent_requests=2, tls_cert_file=str(certs["server.pem"]),
                    tls_key_file=str(certs["server.key"]), tls_client_ca_file=str(certs["ca.pem"]))
    config = ClusterConfig(model=model, num_kv_blocks=64, num_cpus_per_rank=0.5, disaggregate=False,
                           redis_url=redis_url, grpc_port=SECURE_PORT, api=api)
    serve.run(build_app(config), name=SECURE_APP, route_prefix=None)
    yield certs
    serve.delete(SECURE_APP)


def secure_channel(certs: dict[str, Path], client_cert: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs["ca.pem"].read_bytes(),
        private_key=certs["client.key"].read_bytes() if client_cert else None,
        certificate_chain=certs["client.pem"].read_bytes() if client_cert else None)
    return grpc.secure_channel(f"localhost:{SECURE_PORT}", credentials)


KEY = (("authorization", "Bearer sesame"),)


def test_tls_with_a_client_certificate_and_the_api_key_is_served(secured):
    with secure_channel(secured) as channel:
        responses = list(tandem_pb2_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(text="hello", sampling=GREEDY), metadata=KEY, timeout=60))
    assert responses[-1].finish_reason == "length"


def test_a_missing_or_wrong_api_key_is_unauthenticated_but_health_stays_open(secured):
    with secure_channel(secured) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Generate(pb.GenerateRequest(text="hello", sampling=GREEDY), metadata=metadata, timeout=30))
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_plaintext_and_certificateless_clients_are_refused(secured):
    for channel in (grpc.insecure_channel(f"localhost:{SECURE_PORT}"), secure_channel(secured, client_cert=False)):
        with channel, pytest.raises(grpc.RpcError) as raised:
            tandem_pb2_grpc.GenerationStub(channel).ListModels(pb.ListModelsRequest(), metadata=KEY, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_requests_beyond_the_concurrency_limit_are_refused_at_once(secured):
    """Limit 2: with two long streams running, each of 3 more calls gets RESOURCE_EXHAUSTED; then the two
    finish normally and a new call is served."""
    with secure_channel(secured) as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        # Long enough that neither finishes while the others are refused, however slowly the second one starts.
        long = pb.SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        running = [stub.Generate(pb.GenerateRequest(text=f"stream {i}", sampling=long), metadata=KEY, timeout=120)
                   for i in range(2)]
        firsts = [next(call) for call in running]  # both admitted and decoding
        refused = []
        for i in range(3):
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Generate(pb.GenerateRequest(text=f"extra {i}", sampling=GREEDY), metadata=KEY, timeout=30))
            refused.append(raised.value.code())
        finished = [[first, *call][-1].finish_reason for first, call in zip(firsts, running)]
        after = list(stub.Generate(pb.GenerateRequest(text="after", sampling=GREEDY), metadata=KEY, timeout=60))
    assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert finished == ["length", "length"] and after[-1].finish_reason == "length"
    assert_no_blocks_held(SECURE_APP, names=("decode",))


# -- Serve's back-pressure: a pool whose queue is full refuses at once ------------------------------------------

QUEUE_PORT, QUEUE_APP = 16053, "tandem-grpc-queue"


@pytest.fixture(scope="module")
def one_slot(model, redis_url):
    """A unified pool whose only replica serves one request at a time and queues one more."""
    config = ClusterConfig(model=model, num_kv_blocks=64, num_cpus_per_rank=0.5, disaggregate=False,
                           redis_url=redis_url, grpc_port=QUEUE_PORT,
                           decode=PoolConfig(max_ongoing_requests=1, max_queued_requests=1))
    serve.run(build_app(config), name=QUEUE_APP, route_prefix=None)
    yield
    serve.delete(QUEUE_APP)


def test_a_full_pool_queue_is_resource_exhausted_and_the_admitted_requests_finish(one_slot):
    with grpc.insecure_channel(f"127.0.0.1:{QUEUE_PORT}") as channel:
        stub = tandem_pb2_grpc.GenerationStub(channel)
        long = pb.SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)  # seconds of decoding
        running = stub.Generate(pb.GenerateRequest(text="the one running", sampling=long), timeout=120)
        first = next(running)  # on the replica, decoding
        waiting = stub.Generate(pb.GenerateRequest(text="the one queued", sampling=GREEDY), timeout=120)
        time.sleep(1.0)  # it reaches the ingress's queue for the pool
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(text="one too many", sampling=GREEDY), timeout=30))
        finished = [[first, *running][-1].finish_reason, list(waiting)[-1].finish_reason]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert finished == ["length", "length"]
    assert_no_blocks_held(QUEUE_APP, names=("decode",))
