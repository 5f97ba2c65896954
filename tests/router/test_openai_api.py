"""The OpenAI-compatible HTTP API end to end: a real unified cluster (an ingress and one decode group of a tiny
Llama) behind Serve's HTTP proxy, called with the real `openai` client. Streamed and whole answers agree, usage
counts what the engine did, errors have OpenAI's shape with the right status and field, the API key guards /v1,
and a client that hangs up mid-stream leaves no KV block in use. `tandem bench serve` measures it over HTTP and
gRPC, and the Helm chart's `helm test` pod's script passes against it."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
import ray
import redis
import torch
from grpc import StatusCode
from pydantic import BaseModel, Field
from ray import serve
from transformers import AutoTokenizer

from cluster.app import build_app
from cluster.cli import main
from cluster.client import TandemClient, TandemError
from cluster.config import ClusterConfig
from cluster.redis_server import LocalRedis
from router.api_config import ApiConfig
from tests.conftest import SERVE_HTTP_HOST, SERVE_HTTP_PORT, SERVE_HTTP_URL, with_generation_config
from tests.helm.test_chart import objects as chart_objects
from tests.helm.test_chart import one
from tests.hf_reference import hf_embedding, hf_greedy
from tests.lora_adapters import ATTENTION, MLP, Adapter, merged_model, write_adapter

pytestmark = pytest.mark.slow

APP = "tandem-openai"
GRPC_PORT = 15051  # not the default, so another cluster on this machine does not collide
KEY = "test-key"
SERVED_NAME = "acme/tiny-chat"  # served_model_name: the name clients give, not the model folder's
ADAPTER = "acme/tiny-sql-lora"  # a LoRA adapter on it, which clients give as `model` too
MAX_REQUEST_BYTES = 64 * 1024
MAX_CHOICES = 8
MAX_EMBEDDING_INPUTS = 4
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # long enough for several full KV blocks
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
ORIGIN = "https://app.example.com"  # a web page allowed to call the API from a browser (CORS)
RECOMMENDING_APP, RECOMMENDING_GRPC_PORT = "tandem-openai-recommending", 15052
RECOMMENDED = {"temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3}  # a generation_config.json


@pytest.fixture(scope="module")
def response_store() -> Iterator[str]:
    """A Redis of its own for stored responses (api.response_store_url), apart from the KV index's."""
    server = LocalRedis()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def adapter(tiny_model_factory, tmp_path_factory) -> Adapter:
    return write_adapter(tmp_path_factory.mktemp("lora"), tiny_model_factory("llama"), ATTENTION + MLP, rank=4,
                         alpha=8, seed=5, std=0.2)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """The cluster's lora_dir: adapters put there later are loaded by the first request naming them."""
    return tmp_path_factory.mktemp("lora-dir")


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model_factory, redis_url, response_store, adapter, lora_dir):
    model = str(tiny_model_factory("llama"))
    config = ClusterConfig(model=model, served_model_name=SERVED_NAME, lora_modules={ADAPTER: str(adapter.folder)},
                           lora_dir=str(lora_dir),
                           num_kv_blocks=64, num_cpus_per_rank=0.5,
                           disaggregate=False, redis_url=redis_url, grpc_port=GRPC_PORT,
                           api=ApiConfig(api_key=KEY, max_request_bytes=MAX_REQUEST_BYTES, max_choices=MAX_CHOICES,
                                         max_embedding_inputs=MAX_EMBEDDING_INPUTS,
                                         tool_call_parser="hermes", reasoning_parser="deepseek_r1",
                                         response_store_url=response_store, allow_runtime_lora=True,
                                         allowed_origins=ORIGIN))
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield model
    serve.delete(APP)


@pytest.fixture(scope="module")
def recommending(ray_cluster, tiny_model_factory, redis_url, tmp_path_factory) -> Path:
    """A second cluster, under /recommending: the tiny model with a generation_config.json recommending
    RECOMMENDED (greedy, so HF checks it token for token)."""
    model = with_generation_config(tiny_model_factory("llama"), tmp_path_factory.mktemp("recommending"),
                                   RECOMMENDED)
    config = ClusterConfig(model=str(model), num_kv_blocks=32, num_cpus_per_rank=0.5, disaggregate=False,
                           redis_url=redis_url, grpc_port=RECOMMENDING_GRPC_PORT)
    serve.run(build_app(config), name=RECOMMENDING_APP, route_prefix="/recommending")
    yield model
    serve.delete(RECOMMENDING_APP)


@pytest.fixture(scope="module")
def base_url(cluster) -> str:
    return SERVE_HTTP_URL


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(cluster):
    return AutoTokenizer.from_pretrained(cluster)


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET without credentials."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read().decode()


def metric(base_url: str, sample: str) -> float:
    lines = [line for line in get(f"{base_url}/metrics")[2].splitlines() if line.startswith(sample + " ")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_models_lists_the_served_model_by_its_served_name(client, cluster):
    model, adapter = client.models.list().data
    assert (model.id, model.object, model.owned_by, model.parent) == (SERVED_NAME, "model", "tandem", None)
    assert (adapter.id, adapter.parent) == (ADAPTER, SERVED_NAME)
    assert model.max_model_len == 1024  # the tiny model's context
    assert client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=1).model == SERVED_NAME
    with pytest.raises(openai.NotFoundError, match=SERVED_NAME):
        client.completions.create(model=Path(cluster).name, prompt="Hi", max_tokens=1)


def test_a_lora_adapter_answers_with_the_tokens_of_its_merged_weights_over_http_and_grpc(client, cluster, adapter,
                                                                                         tokenizer, tmp_path):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_greedy(merged_model(adapter, Path(cluster), tmp_path / "merged"), prompt_ids, 12)
    assert expected != hf_greedy(cluster, prompt_ids, 12)  # else the adapter could be left out unnoticed
    grpc = TandemClient(f"localhost:{GRPC_PORT}", api_key=KEY)
    assert [(m.id, m.parent) for m in grpc.models()] == [(SERVED_NAME, None), (ADAPTER, SERVED_NAME)]
    answer = grpc.generate(prompt_ids, model=ADAPTER, max_tokens=12, temperature=0, ignore_eos=True)
    assert answer.token_ids == expected
    completion = client.completions.create(model=ADAPTER, prompt=prompt_ids, **GREEDY)
    assert (completion.model, completion.choices[0].text) == (ADAPTER, answer.text)
    assert client.models.retrieve(ADAPTER).parent == SERVED_NAME
    with pytest.raises(openai.NotFoundError, match=rf"this cluster serves '{SERVED_NAME}', '{ADAPTER}'"):
        client.completions.create(model="acme/other-lora", prompt="Hi", max_tokens=1)
    assert metric(SERVE_HTTP_URL, f'tandem_lora_requests_total{{adapter="{ADAPTER}"}}') == 2
    assert metric(SERVE_HTTP_URL, f'tandem_lora_generation_tokens_total{{adapter="{ADAPTER}"}}') == 24


def group_metric(base_url: str, name: str) -> float:
    """A group metric summed over the cluster's groups (one here: the unified decode group)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in get(f"{base_url}/metrics")[2].splitlines()
               if line.startswith(name + "{"))


def lora_call(base_url: str, path: str, body: dict) -> tuple[int, str]:
    """vLLM's LoRA endpoints answer success in plain text, errors in JSON."""
    request = urllib.request.Request(f"{base_url}/v1/{path}", json.dumps(body).encode(),
                                     headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


def test_an_adapter_loaded_while_the_cluster_runs_answers_with_its_merged_weights_until_unloaded(
        base_url, client, cluster, tokenizer, tmp_path, smollm2_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a loaded adapter is listed, named by requests over
    HTTP and gRPC, and replaced in place (load_inplace) by another folder's weights, never answering with the
    weights it had before; unloaded, it is NOT_FOUND. Folders that are no adapter of this model are refused with
    the reason, before any request can name them."""
    name = "acme/loaded-later"
    first, second = (write_adapter(tmp_path / f"a{seed}", Path(cluster), ATTENTION + MLP, rank=4, alpha=8, seed=seed,
                                   std=0.2) for seed in (11, 12))
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = [hf_greedy(merged_model(a, Path(cluster), tmp_path / f"merged{i}"), prompt_ids, 12)
                for i, a in enumerate((first, second))]
    assert expected[0] != expected[1]

    assert lora_call(base_url, "load_lora_adapter", {"lora_name": name, "lora_path": str(first.folder)}) == \
        (200, f"Success: LoRA adapter '{name}' added successfully.")
    assert [(m.id, m.parent) for m in client.models.list().data][-1] == (name, SERVED_NAME)
    assert client.completions.create(model=name, prompt=prompt_ids, **GREEDY).choices[0].text == \
        tokenizer.decode(expected[0])
    grpc = TandemClient(f"localhost:{GRPC_PORT}", api_key=KEY)
    assert (name, SERVED_NAME) in [(m.id, m.parent) for m in grpc.models()]
    assert grpc.generate(prompt_ids, model=name, max_tokens=12, temperature=0, ignore_eos=True).token_ids == expected[0]
    assert lora_call(base_url, "load_lora_adapter", {"lora_name": name, "lora_path": str(second.folder)}) == \
        (400, f"The lora adapter '{name}' has already been loaded.")

    assert lora_call(base_url, "load_lora_adapter", {"lora_name": name, "lora_path": str(second.folder),
                                                     "load_inplace": True})[0] == 200
    # The same prompt again: the first weights' cached KV blocks are no hit for the second's.
    completion = client.completions.create(model=name, prompt=prompt_ids, **GREEDY)
    assert completion.choices[0].text == tokenizer.decode(expected[1]) and completion.model == name
    assert metric(base_url, f'tandem_lora_requests_total{{adapter="{name}"}}') == 3
    # The decode group loaded both folders under their keys; its load report says so within a second or two.
    deadline = time.monotonic() + 10
    while group_metric(base_url, "tandem_group_lora_loads_total") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_metric(base_url, "tandem_group_lora_loads_total") == 2
    assert group_metric(base_url, "tandem_group_lora_adapters") == 3  # with the adapter started with

    assert lora_call(base_url, "unload_lora_adapter", {"lora_name": name}) == \
        (200, f"Success: LoRA adapter '{name}' removed successfully.")
    with pytest.raises(openai.NotFoundError, match=f"'{name}' is not served here"):
        client.completions.create(model=name, prompt="Hi", max_tokens=1)
    assert lora_call(base_url, "unload_lora_adapter", {"lora_name": name}) == \
        (404, f"The lora adapter '{name}' cannot be found.")
    assert lora_call(base_url, "unload_lora_adapter", {"lora_name": ADAPTER})[0] == 400  # started with it

    other_model = write_adapter(tmp_path / "other", smollm2_path, ("q_proj",), rank=4, alpha=8, seed=1,
                                layers=range(1)).folder
    for path, message in [(str(tmp_path / "nowhere"), r"lora_path: LoRA adapter 'x': cannot read"),
                          ("relative/folder", r"lora_path: must be an absolute path"),
                          (str(other_model), r"lora_path: LoRA adapter 'x': layer 0 q_proj has A .* an adapter "
                                             r"of another model")]:
        status, error = lora_call(base_url, "load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert status == 400 and re.match(message, error), error
    assert [m.id for m in client.models.list().data] == [SERVED_NAME, ADAPTER]


def test_the_grpc_api_loads_and_unloads_adapters_with_the_http_apis_checks(cluster, tokenizer, tmp_path):
    """LoadLoRAAdapter and UnloadLoRAAdapter answer as /v1/load_lora_adapter and /v1/unload_lora_adapter do, in
    gRPC's status codes."""
    name = "grpc-loaded"
    adapter = write_adapter(tmp_path / "a", Path(cluster), ATTENTION + MLP, rank=4, alpha=8, seed=13, std=0.2)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_greedy(merged_model(adapter, Path(cluster), tmp_path / "merged"), prompt_ids, 12)
    client = TandemClient(f"localhost:{GRPC_PORT}", api_key=KEY)

    def refusal(call, *args) -> tuple[StatusCode, str]:
        with pytest.raises(TandemError) as refused:
            call(*args)
        return refused.value.code, refused.value.details

    client.load_lora_adapter(name, str(adapter.folder))
    assert (name, SERVED_NAME) in [(m.id, m.parent) for m in client.models()]
    assert client.generate(prompt_ids, model=name, max_tokens=12, temperature=0, ignore_eos=True).token_ids == expected
    assert refusal(client.load_lora_adapter, name, str(adapter.folder)) == \
        (StatusCode.INVALID_ARGUMENT, f"The lora adapter '{name}' has already been loaded.")
    assert refusal(client.load_lora_adapter, "x", "relative/folder")[0] is StatusCode.INVALID_ARGUMENT
    client.unload_lora_adapter(name)
    assert refusal(lambda: client.generate("Hi", model=name, max_tokens=1))[0] is StatusCode.NOT_FOUND
    assert refusal(client.unload_lora_adapter, name) == \
        (StatusCode.NOT_FOUND, f"The lora adapter '{name}' cannot be found.")
    assert refusal(client.unload_lora_adapter, ADAPTER)[0] is StatusCode.INVALID_ARGUMENT  # started with it


def test_an_adapter_put_in_lora_dir_is_loaded_by_the_first_requests_that_name_it(client, cluster, tokenizer, lora_dir,
                                                                                  adapter, tmp_path, smollm2_path):
    """vLLM's filesystem LoRA resolver: <lora_dir>/<name> is loaded when a request names it, once however many
    requests name it at the same time, over HTTP and gRPC alike; one that does not fit the model is refused with
    the reason, and a name outside lora_dir stays NOT_FOUND."""
    names = ["acme/found-lora", "found-by-grpc"]
    adapters = [write_adapter(lora_dir / name, Path(cluster), ATTENTION + MLP, rank=4, alpha=8, seed=21 + i, std=0.2)
                for i, name in enumerate(names)]
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = [hf_greedy(merged_model(a, Path(cluster), tmp_path / f"merged{i}"), prompt_ids, 12)
                for i, a in enumerate(adapters)]
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda _: client.completions.create(model=names[0], prompt=prompt_ids, **GREEDY)
                              .choices[0].text, range(3)))
    assert texts == [tokenizer.decode(expected[0])] * 3
    grpc = TandemClient(f"localhost:{GRPC_PORT}", api_key=KEY)
    assert grpc.generate(prompt_ids, model=names[1], max_tokens=12, temperature=0, ignore_eos=True).token_ids == \
        expected[1]
    assert [m.id for m in client.models.list().data][-2:] == names
    write_adapter(lora_dir / "of-another-model", smollm2_path, ("q_proj",), rank=4, alpha=8, seed=1, layers=range(1))
    with pytest.raises(openai.BadRequestError, match=r"model: LoRA adapter 'of-another-model': layer 0 q_proj has A") \
            as refused:
        client.completions.create(model="of-another-model", prompt="Hi", max_tokens=1)
    assert refused.value.body["param"] == "model"
    assert (lora_dir / ".." / adapter.folder.name / "adapter_config.json").is_file()
    for outside in [f"../{adapter.folder.name}", f"{lora_dir}/acme/found-lora", "acme/missing"]:
        with pytest.raises(openai.NotFoundError, match="is not served here"):
            client.completions.create(model=outside, prompt="Hi", max_tokens=1)
    for name in names:  # the module's other tests list the models started with
        assert lora_call(SERVE_HTTP_URL, "unload_lora_adapter", {"lora_name": name})[0] == 200
    for folder in ("acme", names[1], "of-another-model"):
        shutil.rmtree(lora_dir / folder)


def test_a_model_is_retrieved_by_its_name(client, model_name):
    model = client.models.retrieve(model_name)
    assert (model.id, model.object, model.max_model_len) == (model_name, "model", 1024)
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-5")
    assert refused.value.body["param"] == "model"


def post(base_url: str, path: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"{base_url}{path}", json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tokenize_gives_the_ids_the_model_sees_and_detokenize_reverses_it(base_url, client, model_name, tokenizer):
    status, tokens = post(base_url, "/tokenize", {"model": model_name, "prompt": PROMPT})
    assert status == 200 and tokens["tokens"] == tokenizer.encode(PROMPT)
    assert (tokens["count"], tokens["max_model_len"]) == (len(tokens["tokens"]), 1024)
    completion = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=1)
    assert completion.usage.prompt_tokens == tokens["count"]
    _, chat = post(base_url, "/tokenize", {"messages": MESSAGES})
    answer = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens
    assert post(base_url, "/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": PROMPT})
    status, refused = post(base_url, "/detokenize", {"tokens": [10**9]})
    assert status == 400 and refused["error"]["param"] == "tokens"
    assert post(base_url, "/tokenize", {"prompt": "x"}, key=None)[0] == 401


def test_a_streamed_completion_adds_up_to_the_whole_one(client, model_name, tokenizer):
    whole = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY)
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    [choice] = whole.choices
    assert whole.object == "text_completion" and choice.finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # include_usage: a last chunk
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    prompt_tokens = len(tokenizer.encode(PROMPT))
    usage = whole.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, 12,
                                                                                   prompt_tokens + 12)


def test_a_streamed_chat_completion_adds_up_to_the_whole_one(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, stream=True, **GREEDY))
    [choice] = whole.choices
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert whole.usage.completion_tokens == 12


def test_max_completion_tokens_and_a_token_id_prompt(client, model_name, tokenizer):
    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, max_completion_tokens=3,
                                          temperature=0, extra_body={"ignore_eos": True})
    ids = tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model_name, prompt=ids, **GREEDY)
    by_text = client.completions.create(model=model_name, prompt=[PROMPT], **GREEDY)  # a batch of one
    assert chat.usage.completion_tokens == 3
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_a_batch_of_prompts_gets_one_choice_each_in_order(client, model_name):
    prompts = [PROMPT, "Once upon a time", "The capital of France is"]
    batch = client.completions.create(model=model_name, prompt=prompts, **GREEDY)
    alone = [client.completions.create(model=model_name, prompt=prompt, **GREEDY) for prompt in prompts]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 3 * 12


def test_n_choices_are_sampled_apart_and_each_is_reproducible(client, model_name):
    sampled = dict(model=model_name, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7,
                   extra_body={"ignore_eos": True})
    three = client.completions.create(n=3, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) == 3
    assert three.usage.completion_tokens == 36
    assert three.usage.prompt_tokens == client.completions.create(**sampled).usage.prompt_tokens  # counted once
    # Choice i is seeded seed + i, as vLLM seeds its n samples.
    assert client.completions.create(**sampled | {"seed": 9}).choices[0].text == three.choices[2].text
    greedy = client.chat.completions.create(model=model_name, messages=MESSAGES, n=2, **GREEDY)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_streamed_choices_interleave_and_add_up_to_the_whole_ones(client, model_name):
    """With vLLM's continuous_usage_stats, every chunk also says its choice's usage so far."""
    request = dict(model=model_name, messages=MESSAGES, n=2, max_tokens=12, temperature=1.0, seed=3,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **request))
    for choice in whole.choices:
        mine = [c for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert mine[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].choices[0].finish_reason == "length"
        generated = [c.usage.completion_tokens for c in mine]
        assert generated == sorted(generated) and (generated[0], generated[-1]) == (0, 12)
        assert {c.usage.prompt_tokens for c in mine} == {whole.usage.prompt_tokens}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert all(len(c.choices) <= 1 for c in chunks)


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, model_name):
    prompt = "A long shared system prompt that many requests repeat word for word. " * 4
    first = client.completions.create(model=model_name, prompt=prompt + "One", **GREEDY)
    second = client.completions.create(model=model_name, prompt=prompt + "Two", **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0  # whole KV blocks


def test_logprobs_come_in_openais_shapes(client, model_name):
    completion = client.completions.create(model=model_name, prompt=PROMPT, logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 12
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])
    # Greedy: the chosen token is the most likely one.
    assert all(lp == max(top.values()) for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs))
    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                          **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.token == entry.top_logprobs[0].token for entry in content)


def test_a_chat_reply_can_continue_the_last_message(base_url, client, model_name, tokenizer):
    started = MESSAGES + [{"role": "assistant", "content": "The capital of France is"}]
    rendered = tokenizer.apply_chat_template(started, continue_final_message=True, tokenize=True,
                                             return_dict=False)
    continued = client.chat.completions.create(model=model_name, messages=started, **GREEDY | {"extra_body": {
        "ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True}})
    as_text = client.completions.create(model=model_name, prompt=list(rendered), **GREEDY)
    assert continued.usage.prompt_tokens == len(rendered)
    assert continued.choices[0].message.content == as_text.choices[0].text
    _, tokens = post(base_url, "/tokenize", {"messages": started, "add_generation_prompt": False,
                                             "continue_final_message": True})
    assert tokens["tokens"] == list(rendered)
    with pytest.raises(openai.BadRequestError) as refused:  # vLLM's rule: the two ways are exclusive
        client.chat.completions.create(model=model_name, messages=started, max_tokens=2,
                                       extra_body={"continue_final_message": True})
    assert refused.value.param == "continue_final_message"


def test_echo_puts_the_prompt_and_its_logprobs_first(client, model_name, tokenizer):
    plain = client.completions.create(model=model_name, prompt=PROMPT, logprobs=1, **GREEDY).choices[0]
    echoed = client.completions.create(model=model_name, prompt=PROMPT, echo=True, **GREEDY).choices[0]
    assert echoed.text == PROMPT + plain.text and echoed.logprobs is None
    streamed = list(client.completions.create(model=model_name, prompt=PROMPT, echo=True, stream=True, **GREEDY))
    assert streamed[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in streamed) == echoed.text
    # As an evaluation harness scores text: the prompt is the greedy continuation itself, so its tokens' logprobs
    # must be the ones they had when generated.
    ids = tokenizer.encode(PROMPT)
    generated = tokenizer.encode(plain.text, add_special_tokens=False)
    scored = client.completions.create(model=model_name, prompt=ids + generated, max_tokens=1, temperature=0,
                                       logprobs=1, echo=True).choices[0].logprobs
    assert len(scored.tokens) == len(ids) + len(generated) + 1
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    assert scored.tokens[len(ids):-1] == plain.logprobs.tokens  # the text tokenizes back to the same tokens
    assert scored.token_logprobs[len(ids):-1] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-3)
    assert scored.text_offset[0] == 0 and "".join(scored.tokens[:len(ids)]) == PROMPT
    # max_tokens 0: the prompt alone, as scoring clients ask for it, whole or streamed.
    alone = dict(model=model_name, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    only = client.completions.create(**alone)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    expected = scored.token_logprobs[1:len(ids)]  # the same positions, in a shorter prompt
    assert only.choices[0].logprobs.token_logprobs[0] is None
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    chunks = [c for c in client.completions.create(stream=True, **alone) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(prompt=""), "prompt"),
    (dict(n=0), "n"),
    (dict(n=MAX_CHOICES + 1), "n"),
    (dict(prompt=["one"] * 3, n=MAX_CHOICES // 2), "prompt"),  # the choices of a batch count together
    (dict(prompt=["one", []]), "prompt"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"logit_bias": {"one": 5}}), "logit_bias"),
    (dict(extra_body={"logit_bias": {"5": 101}}), "logit_bias"),
    (dict(extra_body={"top_k": "many"}), "top_k"),  # a wrong JSON type: 400, not FastAPI's 422
    (dict(extra_body={"min_p": 2}), "min_p"),
    (dict(extra_body={"min_tokens": 5}), "min_tokens"),  # more than max_tokens
    (dict(temperature=-1, stream=True), "temperature"),  # an ordinary JSON error, not a broken stream
    (dict(extra_body={"allowed_token_ids": [10**9]}), "allowed_token_ids"),
    (dict(extra_body={"bad_words": [""]}), "bad_words"),
    (dict(extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens"),
    (dict(extra_body={"priority": 1}), "priority"),  # this server schedules in arrival order
])
def test_bad_input_is_a_400_naming_the_field(client, model_name, kwargs, param):
    request = dict(model=model_name, prompt="Hello", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**request)
    error = refused.value
    assert (error.status_code, error.body["code"], error.type) == (400, 400, "invalid_request_error")
    assert error.param == param
    assert error.body["message"].startswith(param)


def test_a_field_of_several_forms_says_which_it_takes(client, model_name):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model_name, prompt=["one", [1, 2]], max_tokens=4)
    assert refused.value.body["message"] == "prompt: must be one of str, list[str], list[int], list[list[int]]"
    assert refused.value.param == "prompt"


def test_chat_errors_name_the_chat_fields(client, model_name):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_completion_tokens=0)
    assert refused.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model_name, messages=[{"role": "robot", "content": "hi"}])
    assert refused.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as refused:  # the rendered messages outgrow the context
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi " * 2000}])
    assert refused.value.param == "messages"


def test_embeddings_are_hfs_vectors_in_input_order_as_floats_or_base64(client, model_name, cluster, tokenizer):
    texts = [PROMPT, "Hello world"]
    ids = [tokenizer.encode(text) for text in texts]
    latencies = metric(SERVE_HTTP_URL, "tandem_e2e_request_latency_seconds_count")
    as_base64 = client.embeddings.create(model=model_name, input=texts)  # what the openai client asks for
    as_floats = client.embeddings.create(model=model_name, input=texts, encoding_format="float")
    for result in (as_base64, as_floats):
        assert (result.object, result.model, [d.index for d in result.data]) == ("list", model_name, [0, 1])
        for data, prompt in zip(result.data, ids):
            torch.testing.assert_close(torch.tensor(data.embedding), hf_embedding(cluster, prompt), atol=2e-5,
                                       rtol=0)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == len(ids[0]) + len(ids[1])
    assert metric(SERVE_HTTP_URL, "tandem_e2e_request_latency_seconds_count") - latencies == 4  # one per input
    shorter = client.embeddings.create(model=model_name, input=ids[1], dimensions=16, encoding_format="float")
    torch.testing.assert_close(torch.tensor(shorter.data[0].embedding),
                               torch.nn.functional.normalize(hf_embedding(cluster, ids[1])[:16], dim=0), atol=2e-5,
                               rtol=0)


def test_an_embedding_under_a_lora_adapter_is_that_of_its_merged_weights(client, cluster, adapter, tokenizer,
                                                                         tmp_path):
    ids = tokenizer.encode(PROMPT)
    result = client.embeddings.create(model=ADAPTER, input=[ids], encoding_format="float")
    merged = merged_model(adapter, Path(cluster), tmp_path / "merged")
    assert result.model == ADAPTER
    torch.testing.assert_close(torch.tensor(result.data[0].embedding), hf_embedding(merged, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    (dict(input=""), "input", "input: must not be empty"),
    (dict(input=["fine", ""]), "input[1]", "input[1]: must not be empty"),
    (dict(input=[[1, 49152]]), "input[0]", "input[0]: token id 49152 is outside the vocabulary"),
    (dict(input="hi " * 2000), "input", "input: 2001 tokens exceed the model's context length (1024)"),
    (dict(input="hi", dimensions=0), "dimensions", "dimensions: must be in [1, 64]"),
    (dict(input=["x"] * (MAX_EMBEDDING_INPUTS + 1)), "input", f"input: at most {MAX_EMBEDDING_INPUTS} inputs"),
    (dict(input="hi", encoding_format="hex"), "encoding_format", "encoding_format: Input should be 'float' or"),
    (dict(input="hi", extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens", "truncate_prompt_tokens"),
    (dict(input=[{"text": "hi"}]), "input", "input: must be one of str, list[str], list[int], list[list[int]]"),
])
def test_bad_embeddings_input_is_a_400_naming_the_field(client, model_name, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=model_name, **kwargs)
    assert (refused.value.status_code, refused.value.param) == (400, param)
    assert refused.value.body["message"].startswith(message)


DOCUMENTS = ["The cat sat on the mat.", "Stock prices fell sharply today.", "A kitten slept on the rug."]


def test_score_is_the_cosine_of_hfs_embeddings_one_against_many_or_pair_by_pair(base_url, model_name, cluster,
                                                                               tokenizer):
    vectors = [hf_embedding(cluster, tokenizer.encode(text)) for text in DOCUMENTS]
    status, one_to_many = post(base_url, "/v1/score", {"model": model_name, "text_1": DOCUMENTS[0],
                                                       "text_2": DOCUMENTS})
    assert status == 200 and one_to_many["model"] == model_name
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx([float(vectors[0] @ v) for v in vectors],
                                                                      abs=1e-5)
    assert one_to_many["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    status, pairs = post(base_url, "/score", {"model": model_name, "text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[1:]})
    assert status == 200
    assert [d["score"] for d in pairs["data"]] == pytest.approx([float(vectors[0] @ vectors[1]),
                                                                 float(vectors[1] @ vectors[2])], abs=1e-5)
    assert pairs["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t)) for t in DOCUMENTS[:2] + DOCUMENTS[1:])


def test_rerank_orders_the_documents_by_the_cosine_with_the_query_and_keeps_the_top_n(base_url, model_name, cluster,
                                                                                      tokenizer):
    query = "Where did the cat sleep?"
    scores = [float(hf_embedding(cluster, tokenizer.encode(query)) @ hf_embedding(cluster, tokenizer.encode(text)))
              for text in DOCUMENTS]
    order = sorted(range(3), key=lambda i: -scores[i])
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        status, ranked = post(base_url, path, {"model": model_name, "query": query, "documents": DOCUMENTS,
                                               "top_n": 2})
        assert status == 200
        assert [r["index"] for r in ranked["results"]] == order[:2]
        assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([scores[i] for i in order[:2]],
                                                                                 abs=1e-5)
        assert [r["document"]["text"] for r in ranked["results"]] == [DOCUMENTS[i] for i in order[:2]]
    status, bare = post(base_url, "/v1/rerank", {"query": query, "documents": [{"text": t} for t in DOCUMENTS],
                                                 "return_documents": False})
    assert status == 200 and [r["index"] for r in bare["results"]] == order
    assert all("document" not in r for r in bare["results"])


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
    ("/v1/score", {"text_1": "a", "text_2": []}, "text_2"),
    ("/v1/score", {"text_1": "a", "text_2": ["fine", ""]}, "text_2[1]"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["x"] * MAX_EMBEDDING_INPUTS}, "documents"),  # with the query, 1 over
    ("/classify", {"input": "a"}, "model"),  # a generative model has no classification head
])
def test_bad_score_rerank_and_classify_input_is_a_400_naming_the_field(base_url, path, body, param):
    status, refused = post(base_url, path, body)
    assert (status, refused["error"]["param"]) == (400, param), refused
    assert refused["error"]["message"].startswith(param)


RESPONSE = dict(max_output_tokens=12, temperature=0, extra_body={"ignore_eos": True})


def test_a_response_answers_as_the_chat_completion_of_its_messages(client, model_name):
    question = MESSAGES[0]["content"]
    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    response = client.responses.create(model=model_name, input=question, **RESPONSE)
    assert (response.object, response.id[:5], response.model) == ("response", "resp_", model_name)
    [message] = response.output
    assert (message.type, message.role, message.content[0].type) == ("message", "assistant", "output_text")
    assert response.output_text == chat.choices[0].message.content
    # Cut short by max_output_tokens: incomplete, as OpenAI says it.
    assert (response.status, message.status, response.incomplete_details.reason) == (
        "incomplete", "incomplete", "max_output_tokens")
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert usage.total_tokens == usage.input_tokens + 12
    # Instructions are a system message ahead of the input; a developer message is one too; text parts join.
    system = [{"role": "system", "content": "Answer briefly."}]
    briefed = client.chat.completions.create(model=model_name, messages=system + MESSAGES, **GREEDY)
    instructed = client.responses.create(model=model_name, instructions="Answer briefly.", input=question, **RESPONSE)
    items = client.responses.create(model=model_name, input=[
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}], **RESPONSE)
    assert instructed.output_text == items.output_text == briefed.choices[0].message.content
    assert instructed.instructions == "Answer briefly."


def test_a_streamed_response_sends_openais_events_and_adds_up_to_the_whole_one(client, model_name):
    whole = client.responses.create(model=model_name, input=PROMPT, **RESPONSE)
    events = list(client.responses.create(model=model_name, input=PROMPT, stream=True, **RESPONSE))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events[4:-4]) == events[-4].text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == 12
    # A stop string ends it early and complete: the SDK's stream helper then has its final response.
    stop = whole.output_text[len(whole.output_text) // 2:][:3]
    with client.responses.stream(model=model_name, input=PROMPT, max_output_tokens=12, temperature=0,
                                 extra_body={"stop": [stop]}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == whole.output_text[:whole.output_text.index(stop)]


def test_a_response_carries_token_logprobs_when_asked(client, model_name):
    asked = dict(model=model_name, input=PROMPT, top_logprobs=2, include=["message.output_text.logprobs"],
                 **RESPONSE)
    logprobs = client.responses.create(**asked).output[0].content[0].logprobs
    assert len(logprobs) == 12 and all(len(entry.top_logprobs) == 2 for entry in logprobs)
    assert all(entry.token == entry.top_logprobs[0].token for entry in logprobs)  # greedy: the likeliest
    streamed = [entry for event in client.responses.create(stream=True, **asked)
                if event.type == "response.output_text.delta" for entry in event.logprobs]
    assert [entry.token for entry in streamed] == [entry.token for entry in logprobs]
    assert client.responses.create(model=model_name, input=PROMPT, **RESPONSE).output[0].content[0].logprobs == []


def test_a_stored_response_is_retrieved_continued_and_deleted(client, model_name, response_store, redis_url):
    first = client.responses.create(model=model_name, instructions="Be brief.", input="My name is Ada.", **RESPONSE)
    assert first.store and client.responses.retrieve(first.id).output_text == first.output_text
    # Kept in the Redis api.response_store_url names, not in the KV index's.
    assert [list(redis.Redis.from_url(url).scan_iter(f"*{first.id}*")) != [] for url in (response_store, redis_url)] \
        == [True, False]
    # The next turn starts from the stored conversation (not its instructions), whichever replica serves it.
    second = client.responses.create(model=model_name, previous_response_id=first.id, input="What is my name?",
                                     **RESPONSE)
    whole = client.responses.create(model=model_name, store=False, input=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}], **RESPONSE)
    assert second.output_text == whole.output_text and second.previous_response_id == first.id
    assert second.usage.input_tokens == whole.usage.input_tokens
    # A streamed response is stored before its last event, so a client can continue from it at once.
    events = list(client.responses.create(model=model_name, previous_response_id=second.id, input="And again?",
                                          stream=True, **RESPONSE))
    streamed = events[-1].response
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    client.responses.delete(first.id)
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as refused:
            call(first.id)
        assert refused.value.param == "response_id"
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model=model_name, previous_response_id=first.id, input="Still there?")
    assert refused.value.param == "previous_response_id"
    # store: false keeps nothing.
    assert not whole.store
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)


def test_a_stored_responses_input_items_are_what_it_answered_a_page_at_a_time(client, model_name):
    """GET /v1/responses/{id}/input_items: the turns before the response (earlier replies and function calls
    included; instructions and its own output not), newest first unless asked, in pages the client follows. Only
    a background response can be cancelled, or streamed again."""
    first = client.responses.create(model=model_name, instructions="Be brief.", input="My name is Ada.", **RESPONSE)
    second = client.responses.create(model=model_name, previous_response_id=first.id, input=[
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": "And my name?"}], **RESPONSE)
    items = list(client.responses.input_items.list(second.id, order="asc", limit=2))  # three pages
    assert [(item.type, getattr(item, "role", None)) for item in items] == [
        ("message", "user"), ("message", "assistant"), ("function_call", None), ("function_call_output", None),
        ("message", "user")]
    assert [items[0].content[0].text, items[1].content[0].text, items[4].content[0].text] == [
        "My name is Ada.", first.output_text, "And my name?"]
    assert (items[2].call_id, items[2].name, items[2].arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
    assert (items[3].call_id, items[3].output) == ("call_1", "sunny")
    newest_first = client.responses.input_items.list(second.id)
    assert [item.id for item in newest_first.data] == [item.id for item in reversed(items)]
    assert not newest_first.has_more and newest_first.first_id == items[-1].id
    assert [item.content[0].text for item in client.responses.input_items.list(first.id)] == ["My name is Ada."]
    for query, param in ((dict(limit=0), "limit"), (dict(order="up"), "order"), (dict(after="msg_x"), "after")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.input_items.list(second.id, **query)
        assert refused.value.param == param
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.input_items.list("resp_unknown")
    assert refused.value.param == "response_id"
    with pytest.raises(openai.BadRequestError, match="only a background response can be cancelled"):
        client.responses.cancel(second.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.retrieve(second.id, stream=True)
    assert refused.value.param == "stream"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")


def test_input_tokens_counts_the_prompt_a_response_would_read(client, model_name):
    asked = dict(model=model_name, instructions="Be brief.", input="My name is Ada.")
    first = client.responses.create(**asked, **RESPONSE)
    assert client.responses.input_tokens.count(**asked).input_tokens == first.usage.input_tokens
    following = dict(model=model_name, previous_response_id=first.id, input="What is my name?")
    counted = client.responses.input_tokens.count(**following)
    assert (counted.object, counted.input_tokens) == (
        "response.input_tokens", client.responses.create(**following, **RESPONSE).usage.input_tokens)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.input_tokens.count(model=model_name)
    assert refused.value.param == "input"


def test_truncation_auto_drops_the_oldest_turns_whole_until_the_prompt_fits(client, model_name, base_url):
    said = "The old city walls had seven gates, each named for the road that left through it. " * 5
    conversation = [{"role": role, "content": f"{i}: {said}"} for i in range(8) for role in ("user", "assistant")]
    conversation.append({"role": "user", "content": "Which gate was the oldest?"})
    asked = dict(model=model_name, instructions="Be brief.", input=conversation, **RESPONSE)
    with pytest.raises(openai.BadRequestError) as refused:  # the model's 1024 tokens cannot hold it all
        client.responses.create(**asked)
    assert refused.value.param == "input"
    truncated = client.responses.create(truncation="auto", **asked)

    def prompt_tokens(messages: list[dict]) -> int:
        return post(base_url, "/tokenize", {"messages": [{"role": "system", "content": "Be brief."}, *messages]})[1][
            "count"]

    kept = next(conversation[i:] for i in range(0, len(conversation), 2) if prompt_tokens(conversation[i:]) < 1024)
    assert 1 < len(kept) < len(conversation)
    latest = client.responses.create(model=model_name, instructions="Be brief.", input=kept, **RESPONSE)
    assert (truncated.truncation, truncated.output_text, truncated.usage.input_tokens) == (
        "auto", latest.output_text, latest.usage.input_tokens)
    assert client.responses.input_tokens.count(model=model_name, instructions="Be brief.", input=conversation,
                                               truncation="auto").input_tokens == latest.usage.input_tokens


def finished(client: openai.OpenAI, response_id: str):
    """A background response polled until it ends."""
    deadline = time.monotonic() + 60
    while (response := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"still {response.status}"
        time.sleep(0.1)
    return response


def test_a_background_response_is_queued_at_once_and_polled_to_the_answer_a_foreground_one_gives(client,
                                                                                                 model_name):
    asked = dict(model=model_name, instructions="Be brief.", input="My name is Ada.", **RESPONSE)
    queued = client.responses.create(background=True, **asked)
    assert (queued.status, queued.background, queued.output) == ("queued", True, [])
    done = finished(client, queued.id)
    foreground = client.responses.create(**asked)
    assert (done.status, done.output_text, done.usage.input_tokens, done.usage.output_tokens) == (
        foreground.status, foreground.output_text, foreground.usage.input_tokens, foreground.usage.output_tokens)
    assert done.background and not foreground.background
    # It is stored like any response: the conversation continues from it.
    following = dict(input="What is my name?", **RESPONSE)
    assert client.responses.create(model=model_name, previous_response_id=done.id, **following).output_text == \
        client.responses.create(model=model_name, previous_response_id=foreground.id, **following).output_text


def test_a_background_stream_outlives_its_client_and_is_streamed_again_from_where_it_left_off(client, model_name):
    asked = dict(model=model_name, input=PROMPT, **RESPONSE)
    stream = client.responses.create(background=True, stream=True, **asked)
    seen = [next(stream) for _ in range(5)]  # created, in progress, the message opened, its first text
    stream.close()  # the client hangs up: the response runs on
    assert (seen[0].type, seen[0].response.status, seen[0].response.background) == ("response.created", "queued",
                                                                                      True)
    response_id = seen[0].response.id
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number))
    events = seen + rest
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"  # max_output_tokens ended it
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == client.responses.create(**asked).output_text
    assert finished(client, response_id).output_text == text
    # Streamed again from the start, it is the same events.
    again = list(client.responses.retrieve(response_id, stream=True))
    assert [event.model_dump() for event in again] == [event.model_dump() for event in events]
    for bad in ("--5", "-2", "x"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.retrieve(response_id, stream=True, extra_query={"starting_after": bad})
        assert refused.value.param == "starting_after"


def test_cancelling_a_background_response_stops_its_request_and_frees_its_blocks(client, model_name, base_url):
    cancelled_before = metric(base_url, 'tandem_requests_total{outcome="cancelled"}')
    queued = client.responses.create(model=model_name, input="Once upon a time", background=True,
                                     max_output_tokens=1000, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError, match="is still"):  # a conversation goes on once a response ends
        client.responses.create(model=model_name, previous_response_id=queued.id, input="And then?")
    cancelled = client.responses.cancel(queued.id)
    assert (cancelled.id, cancelled.status) == (queued.id, "cancelled")
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # a second cancellation changes nothing
    with pytest.raises(openai.BadRequestError, match="was cancelled"):
        client.responses.create(model=model_name, previous_response_id=queued.id, input="And then?")
    wait_until_cancelled_and_idle(base_url, cancelled_before)
    # A finished background response is returned as it ended.
    done = client.responses.create(model=model_name, input="Hi", background=True, **RESPONSE)
    assert client.responses.cancel(finished(client, done.id).id).status == "incomplete"


@pytest.mark.parametrize("kwargs, param", [
    (dict(tools=[{"type": "function", "name": "weather", "parameters": {"type": "object"}}], tool_choice="any"),
     "tool_choice"),
    (dict(text={"format": {"type": "xml"}}), "text.format.type"),
    (dict(text={"format": {"type": "json_schema", "name": "answer"}}), "text.format.schema"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
     "input[0].content"),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input[0].type"),
    (dict(input=[{"type": "function_call_output", "output": "42"}]), "input[0].call_id"),
    (dict(input=[{"type": "function_call", "call_id": "c", "arguments": "{}"}]), "input[0].name"),
    (dict(input=[{"role": "tool", "content": "42"}]), "input[0].role"),
    (dict(input=[]), "input"),
    (dict(input="hi " * 2000), "input"),  # over the context
    (dict(max_output_tokens=0), "max_output_tokens"),
    (dict(temperature=-1, stream=True), "temperature"),
    (dict(extra_body={"n": 2}), "n"),
    (dict(background=True, store=False), "background"),
    (dict(background=True, input="hi " * 2000), "input"),  # refused as it comes, not failed later
])
def test_bad_responses_input_is_a_400_naming_the_field(client, model_name, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**dict(model=model_name, input="Hello", max_output_tokens=4) | kwargs)
    assert (refused.value.status_code, refused.value.param) == (400, param)
    assert refused.value.body["message"].startswith(param)


def test_logit_bias_and_penalties_steer_the_choice(client, model_name, tokenizer):
    token = tokenizer.encode(" river")[0]
    forced = dict(model=model_name, prompt=PROMPT, logprobs=0, logit_bias={str(token): 30}, **GREEDY)
    tokens = client.completions.create(**forced).choices[0].logprobs.tokens
    assert tokens == [tokenizer.decode([token])] * 12
    penalised = client.completions.create(**forced | {"extra_body": {"ignore_eos": True, "repetition_penalty": 1.5}},
                                          frequency_penalty=2, presence_penalty=2).choices[0].logprobs.tokens
    assert 1 <= penalised.count(tokens[0]) < 12


def test_vllms_allowed_token_ids_and_bad_words_hold_the_choice(client, model_name, tokenizer):
    plain = client.completions.create(model=model_name, prompt=PROMPT, logprobs=0, **GREEDY).choices[0]
    allowed = sorted({tokenizer.encode(" river")[0], tokenizer.encode(" fox")[0]})
    held = client.completions.create(model=model_name, prompt=PROMPT, logprobs=0, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True, "allowed_token_ids": allowed}).choices[0]
    assert set(held.logprobs.tokens) <= {tokenizer.decode([t]) for t in allowed}
    first = plain.logprobs.tokens[0]
    banned = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "bad_words": [first.strip()]}).choices[0]
    assert first.strip() and first.strip() not in banned.text and banned.text != plain.text


def test_truncate_prompt_tokens_keeps_the_prompts_end_and_echo_shows_it(client, model_name, tokenizer):
    long = PROMPT * 20  # more tokens than the context holds
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model_name, prompt=long, max_tokens=2)
    kept = client.completions.create(model=model_name, prompt=long, max_tokens=2, echo=True,
                                     extra_body={"truncate_prompt_tokens": 30})
    assert kept.usage.prompt_tokens == 30
    assert kept.choices[0].text.startswith(tokenizer.decode(tokenizer.encode(long)[-30:]))
    whole = client.completions.create(model=model_name, prompt=long, max_tokens=2,
                                      extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens + 1 == client.models.list().data[0].max_model_len


def test_chat_template_kwargs_reach_the_template_but_not_its_parameters(base_url, model_name):
    tokenize = dict(model=model_name, messages=MESSAGES)
    same = post(base_url, "/tokenize", tokenize | {"chat_template_kwargs": {"enable_thinking": False}})
    assert same == post(base_url, "/tokenize", tokenize)  # this template has no such variable
    status, refused = post(base_url, "/tokenize", tokenize | {"chat_template_kwargs": {"tokenize": False}})
    assert status == 400 and refused["error"]["param"] == "chat_template_kwargs"
    assert "tokenize" in refused["error"]["message"]


def test_special_tokens_stay_out_of_the_text_unless_asked_for(client, model_name, tokenizer):
    forced = dict(model=model_name, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"1": 100})
    skipped = client.completions.create(**forced, extra_body={"ignore_eos": True}).choices[0].text
    kept = client.completions.create(**forced, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert skipped == "" and kept.choices[0].text == tokenizer.decode([1]) * 3 == "<|im_start|>" * 3


def test_vllms_stop_extensions_keep_the_stop_string_and_hold_stops_back(client, model_name):
    text = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY).choices[0].text
    stop = text[len(text) // 2:][:3]
    kept = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop)] + stop and kept.choices[0].stop_reason == stop
    early = dict(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[text[:2]])
    assert client.completions.create(**early).usage.completion_tokens <= 2  # it matches at once
    held = client.completions.create(**early, extra_body={"ignore_eos": True, "min_tokens": 4})
    assert held.usage.completion_tokens > 4  # a stop string counts only from the fifth token on


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "required": ["zone"], "additionalProperties": False,
                                       "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}


def streamed_calls(chunks) -> tuple[list[dict], set]:
    """Tool calls put together from a stream's deltas, as the openai client's users do (with how many deltas
    carried a part of each call's arguments), and the finish reasons."""
    calls: dict[int, dict] = {}
    finish = set()
    for chunk in chunks:
        for choice in chunk.choices:
            finish.add(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": "", "parts": 0})
                call["id"] = call["id"] or delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
                call["parts"] += bool(delta.function.arguments)
    return [calls[i] for i in sorted(calls)], finish - {None}


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_tool_choice_is_a_tool_call_whole_or_streamed(client, model_name, tool_choice):
    """Named: one call of that function; required: calls of the request's tools (here one, as
    parallel_tool_calls false asks: the random model would go on listing calls). Either way each call's arguments
    follow its tool's schema, and the stream puts together the same calls, their arguments sent as generated."""
    request = dict(model=model_name, messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=tool_choice,
                   parallel_tool_calls=False, max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    calls = whole.message.tool_calls
    assert len(calls) == 1 and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    if isinstance(tool_choice, dict):
        assert [call.function.name for call in calls] == ["get_weather"]
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    streamed, finish = streamed_calls(client.chat.completions.create(**request, stream=True))
    assert finish == {"tool_calls"}
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(c["id"] and c["id"].startswith("call_") and c["parts"] > 1 for c in streamed)


def test_a_conversation_carries_the_calls_and_their_results(client, model_name):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=model_name, messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=4, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(tools=[WEATHER], tool_choice="any"), "tool_choice", 'must be "none", "auto", "required"'),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice",
     "not among the request's tools"),
    (dict(tool_choice="required"), "tool_choice", "no tools"),
    (dict(tools=[{"type": "web_search"}], tool_choice="required"), "tools[0]", "only function tools"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "not both"),
])
def test_a_tool_choice_the_server_cannot_honour_is_a_400(client, model_name, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, **kwargs)
    assert refused.value.param == param and message in refused.value.body["message"]
    answer = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, tools=[WEATHER],
                                            tool_choice="none", response_format={"type": "text"})
    assert answer.choices[0].message.tool_calls is None


def test_unknown_fields_are_ignored(client, model_name):
    answer = client.completions.create(model=model_name, prompt="Hello", max_tokens=2,
                                       extra_body={"frobnicate": True, "user": "someone"})
    assert answer.usage.completion_tokens <= 2


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="gpt-5", prompt="Hello", max_tokens=2)
    assert (refused.value.param, refused.value.body["code"]) == ("model", 404)


def test_an_oversized_body_is_a_413(client, model_name):
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=model_name, prompt="x" * MAX_REQUEST_BYTES, max_tokens=2)
    assert refused.value.status_code == 413 and refused.value.body["code"] == 413


def test_v1_needs_the_api_key_and_health_metrics_and_version_do_not(base_url, model_name):
    stranger = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.completions.create(model=model_name, prompt="Hello", max_tokens=2)
    assert refused.value.status_code == 401 and refused.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    status, _, body = get(f"{base_url}/v1/models")  # no authorization header at all
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert get(f"{base_url}/health")[::2] == (200, "ok")
    status, content_type, _ = get(f"{base_url}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    status, _, body = get(f"{base_url}/version")
    assert status == 200 and json.loads(body) == {"version": version("tandem")}


def test_raw_server_sent_events_end_with_done(base_url, model_name):
    body = json.dumps({"model": model_name, "messages": MESSAGES, "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", body, headers={
        "authorization": f"Bearer {KEY}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_metrics_count_each_request_by_its_outcome(base_url, client, model_name):
    outcomes = ("ok", "invalid_argument", "unauthenticated", "not_found")
    before = {o: metric(base_url, f'tandem_requests_total{{outcome="{o}"}}') for o in outcomes}
    cached_before = metric(base_url, "tandem_cached_prompt_tokens_total")
    for _ in range(2):  # the second is a prefix-cache hit
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    client.embeddings.create(model=model_name, input="Hello")
    assert post(base_url, "/v1/completions", {"model": model_name, "prompt": "Hi", "max_tokens": -1})[0] == 400
    assert post(base_url, "/v1/completions", {"model": model_name, "prompt": "Hi"}, key="wrong")[0] == 401
    assert post(base_url, "/v1/completions", {"model": "no-such-model", "prompt": "Hi"})[0] == 404
    expected = {"ok": 3, "invalid_argument": 1, "unauthenticated": 1, "not_found": 1}
    deadline = time.monotonic() + 10
    while True:  # another ingress replica's counts reach the scraped one within its period (2 s)
        after = {o: metric(base_url, f'tandem_requests_total{{outcome="{o}"}}') for o in outcomes}
        counted = {o: after[o] - before[o] for o in outcomes}
        if counted == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == expected
    assert metric(base_url, "tandem_cached_prompt_tokens_total") > cached_before


def test_metrics_show_latencies_and_the_groups_load(base_url, client, model_name):
    client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10
    while True:  # the decode group's load report reaches Redis within a second
        text = get(f"{base_url}/metrics")[2]
        if 'tandem_group_kv_cache_usage_ratio{group="' in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in ("tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_bucket",
                 "tandem_e2e_request_latency_seconds_bucket", "tandem_prompt_tokens_total",
                 "tandem_cached_prompt_tokens_total", "tandem_generation_tokens_total", "tandem_requests_running",
                 'tandem_group_kv_cache_usage_ratio{group="', 'tandem_group_prefix_cache_hit_rate{group="'):
        assert name in text, name


def test_a_client_that_hangs_up_mid_stream_frees_every_block(client, model_name, base_url):
    cancelled = metric(base_url, 'tandem_requests_total{outcome="cancelled"}')
    stream = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=1000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # the first token arrived: the request holds KV blocks and is decoding
    stream.close()
    wait_until_cancelled_and_idle(base_url, cancelled)
    assert metric(base_url, "tandem_requests_running") == 0


def wait_until_cancelled_and_idle(base_url: str, cancelled_before: float) -> None:
    """Until a request more than before has ended cancelled, and the decode group holds no request and no block."""
    decode = serve.get_deployment_handle("decode", app_name=APP)
    deadline = time.monotonic() + 30
    while True:
        stats = decode.stats.remote().result()
        idle = stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks
        if idle and metric(base_url, 'tandem_requests_total{outcome="cancelled"}') > cancelled_before:
            return
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.2)


class City(BaseModel):
    """Bounded, so that even the tiny random model's output ends well within max_tokens."""

    name: Literal["Paris", "London", "Rome"]
    capital: bool
    rank: int = Field(ge=1, le=9)


CITY_SCHEMA = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                                "size": {"enum": ["small", "large"]}},
               "required": ["code", "size"], "additionalProperties": False}


def test_structured_output_follows_the_schema_the_openai_client_asks_for(client, model_name):
    parsed = client.chat.completions.parse(model=model_name, messages=MESSAGES, max_tokens=40, temperature=0,
                                           response_format=City)
    assert isinstance(parsed.choices[0].message.parsed, City)
    response_format = {"type": "json_schema", "json_schema": {"name": "code", "schema": CITY_SCHEMA, "strict": True}}
    streamed = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=40, temperature=0.8,
                                              seed=3, stream=True, response_format=response_format)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)),
                        CITY_SCHEMA)
    answer = client.responses.create(model=model_name, input="Name a city.", max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "code", "schema": CITY_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(answer.output_text), CITY_SCHEMA)
    assert answer.text.format.type == "json_schema" and answer.text.format.name == "code"


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}, lambda text: re.fullmatch("[0-9]{3}-[0-9]{4}", text)),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
    ({"guided_choice": ["left", "right"]}, lambda text: text in ("left", "right")),
    ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}}, lambda text: re.fullmatch("x[0-9]{2}", text)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY_SCHEMA}}},
     lambda text: jsonschema.validate(json.loads(text), CITY_SCHEMA) or True),
])
def test_vllms_structured_outputs_hold_completions_and_every_choice(client, model_name, extra, check):
    answer = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=40, temperature=1.0, n=3,
                                       extra_body=extra)
    for choice in answer.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "c"}}), "response_format.json_schema.schema",
     "needs its JSON schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "objectx"}}}),
     "response_format", "json: Unsupported type"),
    (dict(extra_body={"structured_outputs": {"regex": "a(b"}}), "structured_outputs", "regex: Regex parsing error"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs", "exactly one"),
    (dict(extra_body={"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}), "structured_outputs",
     "not several"),
    (dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}), "response_format",
     "cannot be combined with ignore_eos"),
])
def test_a_bad_structure_is_a_400_naming_the_field(client, model_name, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**dict(model=model_name, messages=MESSAGES, max_tokens=4) | kwargs)
    assert refused.value.param == param
    assert refused.value.body["message"].startswith(param) and message in refused.value.body["message"]


def test_a_response_can_be_a_function_call_and_continue_from_its_output(client, model_name):
    """The Responses API's layout of tools, calls and their outputs: a forced call comes back as function_call
    items (streamed as generated), and its output, sent as the next input, continues the stored conversation."""
    weather = {"type": "function", **WEATHER["function"]}
    request = dict(model=model_name, input="What is the weather in Paris?", tools=[weather, {
        "type": "function", **CLOCK["function"]}], tool_choice={"type": "function", "name": "get_weather"},
                   max_output_tokens=60, temperature=0)
    whole = client.responses.create(**request)
    [call] = whole.output
    assert (call.type, call.name, call.status, whole.status) == ("function_call", "get_weather", "completed",
                                                                 "completed")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    with client.responses.stream(**request) as stream:
        events = list(stream)
        [streamed] = stream.get_final_response().output
    kinds = [kind for i, kind in enumerate(e.type for e in events) if i == 0 or kind != events[i - 1].type]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == streamed.arguments and len(deltas) > 1
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments) and streamed.call_id != call.call_id
    assert {e.item.call_id for e in events if e.type.startswith("response.output_item")} == {streamed.call_id}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    follow_up = client.responses.create(model=model_name, previous_response_id=whole.id, input=[result],
                                        max_output_tokens=4, temperature=0)
    inline = client.responses.create(model=model_name, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}, result])
    assert follow_up.output_text and follow_up.output_text == inline.output_text
    assert follow_up.usage.input_tokens == inline.usage.input_tokens


# What a Hermes-format model (Qwen2.5) says when it calls a tool, forced here on the random model by a regex.
HERMES_REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n' \
               '</tool_call>'


def test_auto_tool_choice_finds_the_models_own_calls_whole_or_streamed(client, model_name):
    """The cluster's parser (api.tool_call_parser hermes) turns the format's calls into tool_calls; the text
    before them is the content, and no part of a call's markup ever streams as content. Streamed, a call's
    arguments go out as they are generated, and add up to the whole reply's."""
    forced = {"structured_outputs": {"regex": re.escape(HERMES_REPLY)}}
    request = dict(model=model_name, messages=MESSAGES, tools=[WEATHER, CLOCK], max_tokens=80, temperature=0,
                   extra_body=forced)
    whole = client.chat.completions.create(**request).choices[0]
    assert (whole.finish_reason, whole.message.content) == ("tool_calls", "Let me check.\n")
    [call] = whole.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "unit": "C"})
    chunks = list(client.chat.completions.create(**request, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed, finish = streamed_calls(chunks)
    assert (content, finish) == ("Let me check.\n", {"tool_calls"})
    assert [(c["name"], c["arguments"]) for c in streamed] == [(call.function.name, call.function.arguments)]
    assert streamed[0]["parts"] > 1
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, tools=[WEATHER], max_tokens=6,
                                           temperature=0).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")


# What a reasoning model (DeepSeek-R1, Qwen3) says: its thinking, then its answer; forced on the random model by a
# regex (its template does not open the thinking, so the structure holds the reply from its first token).
THINKING, ANSWER = "The user asks for a capital.", "It is Paris."
THINKING_REPLY = {"structured_outputs": {"regex": re.escape(f"<think>{THINKING}</think>{ANSWER}")}}


def test_a_reply_that_thinks_gives_its_thinking_apart_from_its_answer_whole_or_streamed(client, model_name):
    """api.reasoning_parser: the thinking is the message's reasoning_content (and reasoning, vLLM's newer name),
    the answer its content; a stream's deltas add up to the same, and no tag streams as either."""
    request = dict(model=model_name, messages=MESSAGES, max_tokens=60, temperature=0, extra_body=THINKING_REPLY)
    whole = client.chat.completions.create(**request)
    message = whole.choices[0].message
    assert (message.reasoning_content, message.reasoning, message.content) == (THINKING, THINKING, ANSWER)
    assert 0 < whole.usage.completion_tokens_details.reasoning_tokens <= whole.usage.completion_tokens
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(**request, stream=True)
              if chunk.choices]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == THINKING
    assert "".join(getattr(delta, "reasoning", None) or "" for delta in deltas) == THINKING
    assert "".join(delta.content or "" for delta in deltas) == ANSWER
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].message.reasoning_content is None and plain.choices[0].message.content


def test_a_prompt_that_opens_the_thinking_makes_the_reply_think_and_a_structure_wait_for_its_end(client,
                                                                                               model_name):
    """As R1's distills' templates end the prompt with <think> (here: the assistant's turn continued from it). Cut
    off before the end of its thinking, the reply is all thinking; a structure holds only what follows the
    thinking, so until then the reply is the model's own."""
    opened = dict(model=model_name, messages=MESSAGES + [{"role": "assistant", "content": "<think>\n"}],
                  max_tokens=8, temperature=0)
    continued = {"continue_final_message": True, "add_generation_prompt": False}
    free = client.chat.completions.create(**opened, extra_body=continued).choices[0].message
    assert free.content is None and free.reasoning_content
    held = client.chat.completions.create(**opened, extra_body=continued | {"structured_outputs": {"regex": "a{8}"}})
    assert (held.choices[0].message.content, held.choices[0].message.reasoning_content) == (
        None, free.reasoning_content)
    unopened = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                              extra_body={"structured_outputs": {"regex": "a{8}"}})
    assert unopened.choices[0].message.content == "a" * 8


def test_a_response_that_thinks_has_a_reasoning_item_before_its_message_whole_or_streamed(client, model_name):
    request = dict(model=model_name, input=MESSAGES[0]["content"], max_output_tokens=60, temperature=0,
                   extra_body=THINKING_REPLY)
    whole = client.responses.create(**request)
    reasoning, message = whole.output
    assert (reasoning.type, reasoning.content[0].text, reasoning.summary) == ("reasoning", THINKING, [])
    assert (message.type, whole.output_text) == ("message", ANSWER)
    assert whole.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(**request, stream=True))
    kinds = [kind for i, kind in enumerate(e.type for e in events) if i == 0 or kind != events[i - 1].type]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done",
                     "response.output_item.done",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THINKING
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    assert {e.output_index for e in events if e.type.startswith("response.output_text")} == {1}
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    assert events[-1].response.output_text == ANSWER


def test_a_call_cut_off_by_max_output_tokens_ends_incomplete_whole_or_streamed(client, model_name):
    """As far as its arguments went, in an incomplete response, rather than as text."""
    weather = {"type": "function", **WEATHER["function"]}
    request = dict(model=model_name, input="What is the weather in Paris?", tools=[weather], temperature=0,
                   tool_choice={"type": "function", "name": "get_weather"})
    full = client.responses.create(**request, max_output_tokens=60).output[0].arguments
    whole = client.responses.create(**request, max_output_tokens=4)
    [call] = whole.output
    assert (whole.status, call.type, call.status, call.name) == ("incomplete", "function_call", "incomplete",
                                                                 "get_weather")
    assert full.startswith(call.arguments) and 0 < len(call.arguments) < len(full)
    events = list(client.responses.create(**request, max_output_tokens=4, stream=True))
    [streamed] = events[-1].response.output
    assert (events[-1].type, streamed.status, streamed.arguments) == ("response.incomplete", "incomplete",
                                                                      call.arguments)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments


def test_auto_tool_choice_in_the_responses_api_gives_a_message_and_function_calls(client, model_name):
    """Whole or streamed; streamed, the message's text goes out as it is generated, then the calls' arguments,
    and the stream's items are the whole response's."""
    weather = {"type": "function", **WEATHER["function"]}
    request = dict(model=model_name, input="What is the weather in Paris?", tools=[weather], max_output_tokens=80,
                   temperature=0, extra_body={"structured_outputs": {"regex": re.escape(HERMES_REPLY)}})
    answer = client.responses.create(**request)
    message, call = answer.output
    assert (message.type, message.content[0].text) == ("message", "Let me check.\n")
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather",
                                                                  {"city": "Paris", "unit": "C"})
    events = list(client.responses.create(**request, stream=True))
    kinds = [kind for i, kind in enumerate(e.type for e in events) if i == 0 or kind != events[i - 1].type]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    text = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(text) == "Let me check.\n" and len(text) > 1
    assert [(e.item.type, e.output_index) for e in events if e.type == "response.output_item.done"] == [
        ("message", 0), ("function_call", 1)]
    arguments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(arguments) == call.arguments and len(arguments) > 1
    done = events[-1].response.output
    assert [item.id for item in done] == [e.item.id for e in events if e.type == "response.output_item.added"]


def test_bench_serve_sends_the_same_requests_over_http_and_grpc_and_reports_each(cluster, base_url, tmp_path,
                                                                                  capsys):
    """`tandem bench serve`, a client of both of this cluster's APIs. One request at a time, so the later users
    of each system prompt find its blocks cached; each target's requests have their own cache salt, so the gRPC
    run finds nothing of the HTTP run's in the cache: both runs report the same cached tokens."""
    path, prefix, own, out = tmp_path / "serve.json", 32, 8, 4  # 32 tokens: two whole KV blocks
    argv = ["bench", "serve", "--url", base_url, "--url", f"grpc://localhost:{GRPC_PORT}", "--api-key", KEY,
            "--tokenizer", cluster, "--dataset", "shared-prefix", "--num-prefixes", "2", "--prefix-len", str(prefix),
            "--input-len", str(own), "--num-prompts", "6", "--output-len", str(out), "--max-concurrency", "1",
            "--goodput", "e2el:600000", "--json", str(path)]
    assert main(argv) == 0

    http, grpc_ = json.loads(path.read_text())["results"]
    for result in (http, grpc_):
        assert (result["completed"], result["failed"], result["errors"], result["good"]) == (6, 0, {}, 6)
        assert [r["prompt_tokens"] for r in result["requests"]] == [prefix + own] * 6  # the ids, as sent
        assert [r["output_tokens"] for r in result["requests"]] == [out] * 6
        # A chunk may carry several tokens (text held back until its characters are whole), never none.
        assert all(0 < r["ttft_s"] <= r["latency_s"] and 1 <= r["chunks"] <= out and len(r["itl_s"]) == r["chunks"] - 1
                   for r in result["requests"])
        assert result["output_tokens_per_s"] == pytest.approx(6 * out / result["duration_s"])
        assert result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"]
    assert http["cached_tokens"] == grpc_["cached_tokens"] == 4 * prefix
    # Only gRPC responses say where the time to first token went; the stages add up to no more than the client saw.
    assert http["server_ttft_ms"] is None and grpc_["server_ttft_ms"]["prefill_compute"] > 0
    assert sum(grpc_["server_ttft_ms"].values()) <= grpc_["ttft_ms"]["mean"]
    table = capsys.readouterr().out
    assert f"grpc://localhost:{GRPC_PORT} / first" in table and "TPOT p99, ms" in table
    assert "server: prefill compute mean, ms" in table


def test_bench_serve_spreads_its_requests_over_the_lora_adapters_it_is_given(cluster, base_url, tmp_path):
    """vLLM's --lora-modules: each request names one of them, drawn at random by --seed, the same for each
    target."""
    path = tmp_path / "serve.json"
    before = metric(base_url, f'tandem_lora_requests_total{{adapter="{ADAPTER}"}}')
    argv = ["bench", "serve", "--url", base_url, "--url", f"grpc://localhost:{GRPC_PORT}", "--api-key", KEY,
            "--tokenizer", cluster, "--num-prompts", "8", "--input-len", "8", "--output-len", "2",
            "--lora-modules", ADAPTER, SERVED_NAME, "--json", str(path)]
    assert main(argv) == 0
    http, grpc_ = json.loads(path.read_text())["results"]
    models = [r["model"] for r in http["requests"]]
    assert [r["model"] for r in grpc_["requests"]] == models and set(models) == {ADAPTER, SERVED_NAME}
    assert http["completed"] == grpc_["completed"] == 8
    # Each target's warm-up names the base model; its measured requests named the adapter this often.
    assert metric(base_url, f'tandem_lora_requests_total{{adapter="{ADAPTER}"}}') - before == 2 * models.count(ADAPTER)


def test_bench_serve_stops_at_once_on_a_target_it_cannot_use(cluster, base_url, capsys):
    common = ["bench", "serve", "--tokenizer", cluster, "--num-prompts", "1", "--json", "/dev/null"]
    assert main(common + ["--url", base_url, "--api-key", "wrong"]) == 1
    assert "cannot list the models of" in capsys.readouterr().err
    assert main(common + ["--url", "ftp://localhost:21"]) == 2
    assert "the scheme must be http" in capsys.readouterr().err
    assert main(common + ["--url", base_url, "--output-len", "0", "--request-rate", "0"]) == 2
    assert "--output-len, --request-rate: must be positive" in capsys.readouterr().err
    assert main(common + ["--url", base_url, "--api-key", KEY, "--temperature", "-1"]) == 1
    assert "refused the warm-up request: HTTP 400: temperature" in capsys.readouterr().err


def helm_test_pod(api_key: str) -> tuple[list[str], dict[str, str]]:
    """The chart's `helm test` pod as it runs against this cluster: its command, and its environment with the API
    key read from the Secret the chart renders, as the kubelet would. The values point its host and ports here."""
    objs = chart_objects({"tls": {"enabled": False}, "apiKey": {"value": api_key}, "tests": {"host": SERVE_HTTP_HOST},
                          "api": {"grpcPort": GRPC_PORT, "httpPort": SERVE_HTTP_PORT}})
    [container] = one(objs, "Pod", "-test-api")["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    env["TANDEM_API_KEY"] = one(objs, "Secret", ref["name"])["stringData"][ref["key"]]
    return container["command"] + container["args"], env


def run_helm_test_pod(api_key: str) -> subprocess.CompletedProcess:
    command, env = helm_test_pod(api_key)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the image has `tandem` on its PATH
    return subprocess.run(command, env={**os.environ, "PATH": path, **env}, capture_output=True, text=True,
                          timeout=300)


def test_the_charts_helm_test_pod_passes_against_a_serving_cluster_and_fails_on_a_refusal(cluster, client):
    """It prints each API's greedy completion: the one an OpenAI client gets for its prompt."""
    passed = run_helm_test_pod(KEY)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    _, env = helm_test_pod(KEY)
    reply = client.completions.create(model=SERVED_NAME, prompt=env["PROMPT"], max_tokens=8, temperature=0)
    text = reply.choices[0].text
    assert passed.stdout == (f"HTTP: POST {SERVE_HTTP_URL}/v1/completions\n{text}\n"
                             f"gRPC: tandem.v1.Generation/Generate on {SERVE_HTTP_HOST}:{GRPC_PORT}\n{text}\n")
    refused = run_helm_test_pod("wrong")
    assert refused.returncode != 0
    assert 'HTTP 401: {"error":{"message":"a valid API key is required' in refused.stderr, refused.stderr


def test_fields_a_request_leaves_unset_take_the_models_recommended_values_on_both_apis(recommending, tokenizer):
    """max_tokens is at most the model's max_new_tokens where a request gives none; a field a request sets wins."""
    prompt = tokenizer.encode(PROMPT)
    recommended = hf_greedy(recommending, prompt, 5, repetition_penalty=1.3)
    http = openai.OpenAI(base_url=f"{SERVE_HTTP_URL}/recommending/v1", api_key="none", max_retries=0, timeout=120)
    name = recommending.name
    unset = http.completions.create(model=name, prompt=prompt)
    assert (unset.choices[0].text, unset.usage.completion_tokens) == (tokenizer.decode(recommended), 5)
    longer = http.completions.create(model=name, prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert longer.choices[0].text == tokenizer.decode(hf_greedy(recommending, prompt, 7, repetition_penalty=1.3))
    sampled = http.completions.create(model=name, prompt=prompt, temperature=1.0, seed=3)
    assert sampled.usage.completion_tokens == 5 and sampled.choices[0].text != unset.choices[0].text
    chat = http.chat.completions.create(model=name, messages=MESSAGES)  # chat's own default is the whole context
    assert chat.usage.completion_tokens == 5
    grpc = TandemClient(f"localhost:{RECOMMENDING_GRPC_PORT}")
    assert grpc.generate(prompt).token_ids == recommended
    assert grpc.generate(prompt, temperature=1.0, seed=3).token_ids != recommended


def test_every_request_leaves_one_log_line_with_its_outcome_tokens_and_times(cluster, tokenizer):
    """Whichever API it came by (here gRPC, which has no access log of Serve's), and however it ended."""
    grpc = TandemClient(f"localhost:{GRPC_PORT}", api_key=KEY)
    served = grpc.generate(tokenizer.encode(PROMPT), request_id="log-line-ok", max_tokens=3, ignore_eos=True)
    with pytest.raises(TandemError):
        grpc.generate("Hi", request_id="log-line-refused", max_tokens=-1)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    deadline = time.monotonic() + 10
    while True:  # Serve's file handler writes within moments
        text = "".join(log.read_text() for log in logs.glob(f"replica_{APP}_ingress_*.log"))
        if "request log-line-refused" in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    usage = served.usage
    assert re.search(rf"request log-line-ok: ok after [0-9.]+ s, first token after [0-9.]+ s, prompt "
                     rf"{usage.prompt_tokens} tokens \({usage.cached_tokens} cached\), 3 generated", text)
    assert "request log-line-refused: invalid_argument, refused: max_tokens: must be a positive integer, got -1" \
        in text


def browser(method: str, path: str, origin: str, headers: dict[str, str], body: dict | None = None):
    """(status, headers) of what a browser on `origin` sends: a preflight (OPTIONS) or the call itself."""
    request = urllib.request.Request(SERVE_HTTP_URL + path, json.dumps(body).encode() if body else None,
                                     {"origin": origin, **headers}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def test_a_web_page_of_an_allowed_origin_may_call_the_api_from_a_browser_with_its_key(cluster):
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}
    status, headers = browser("OPTIONS", "/v1/chat/completions", ORIGIN, ask)  # the preflight needs no key
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    call = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 2}
    status, headers = browser("POST", "/v1/chat/completions", ORIGIN,
                              {"authorization": f"Bearer {KEY}", "content-type": "application/json"}, call)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, _ = browser("POST", "/v1/chat/completions", ORIGIN, {"content-type": "application/json"}, call)
    assert status == 401  # the key is still required
    status, headers = browser("OPTIONS", "/v1/chat/completions", "https://elsewhere.example", ask)
    assert status == 400 and "access-control-allow-origin" not in headers


