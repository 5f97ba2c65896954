"""The Serve application end to end: a real Ray, a real redis-server, real Serve deployments (an ingress, two
prefill replicas and a decode replica, each replica a worker group), requests through the ingress's handle. The
disaggregated cluster's greedy tokens equal HF's, requests sharing a prefix go to the replica that holds it, and
a stream the caller abandons frees every block on both pools."""

import asyncio
import time
from pathlib import Path

import pytest
import ray
import torch
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig, PoolConfig
from router.api_config import ApiConfig
from router.ingress import EmbedRequest, GenerateRequest
from router.kv_index import KVIndexFollower
from tests.hf_reference import hf_embedding, hf_greedy
from tests.lora_adapters import ATTENTION, MLP, Adapter, merged_model, write_adapter
from workers.engine.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams
from workers.kv.hashing import hash_full_blocks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# Below Linux's ephemeral range (32768-60999): the default 50051 lies in it, where any outgoing connection on the
# machine can hold it for a moment, and did once in CI.
GRPC_PORT = 16071


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory) -> Adapter:
    return write_adapter(tmp_path_factory.mktemp("lora"), Path(model), ATTENTION + MLP, rank=4, alpha=8, seed=4,
                         std=0.2)


@pytest.fixture(scope="module")
def ingress(model, redis_url, adapter):
    config = ClusterConfig(model=model, num_kv_blocks=64, num_cpus_per_rank=0.5, kv_transfer_timeout_s=10,
                           prefill=PoolConfig(replicas=2), redis_url=redis_url, grpc_port=GRPC_PORT,
                           lora_modules={"tiny-lora": str(adapter.folder)}, api=ApiConfig(allow_runtime_lora=True))
    handle = serve.run(build_app(config), name="tandem-test", route_prefix=None)
    yield handle
    serve.delete("tandem-test")


def pool(name: str):
    return serve.get_deployment_handle(name, app_name="tandem-test")


async def final(ingress, request: GenerateRequest):
    outs = [o async for o in ingress.options(stream=True).generate.remote(request)]
    assert outs[-1].finished
    return outs[-1]


async def tokens(ingress, request: GenerateRequest) -> list[int]:
    return (await final(ingress, request)).outputs[0].token_ids


def test_disaggregated_cluster_gives_hfs_greedy_tokens(ingress, model):
    prompts = [[(7 * i + j) % 49152 for j in range(20 + 9 * i)] for i in range(4)]

    async def run():
        return await asyncio.gather(*(tokens(ingress, GenerateRequest(prompt_token_ids=p, params=GREEDY))
                                      for p in prompts))

    assert asyncio.run(run()) == [hf_greedy(model, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("loaded", ["at start", "while the cluster runs"])
def test_a_lora_adapters_request_gets_its_adapters_tokens_through_prefill_transfer_and_decode(ingress, model, adapter,
                                                                                              tmp_path, loaded):
    """An adapter loaded while the cluster runs reaches the prefill group that computes the prompt, and the decode
    group that continues it, with the request that names it."""
    prompt = [(11 * j) % 49152 for j in range(45)]
    name = "tiny-lora"
    if loaded == "while the cluster runs":
        name = "tiny-lora-later"
        ingress.load_lora_adapter.remote(name, str(adapter.folder)).result()
    request = GenerateRequest(prompt_token_ids=prompt, params=GREEDY, model=name)
    out = asyncio.run(final(ingress, request))
    if name != "tiny-lora":
        ingress.unload_lora_adapter.remote(name).result()
    expected = hf_greedy(merged_model(adapter, Path(model), tmp_path / "merged"), prompt, GREEDY.max_tokens)
    assert out.outputs[0].token_ids == expected != hf_greedy(model, prompt, GREEDY.max_tokens)
    assert out.metrics.kv_transfer_bytes > 0  # the decode group received the prompt's KV from a prefill group


def test_chat_messages_are_rendered_with_the_models_template(ingress, model):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    got = asyncio.run(tokens(ingress, GenerateRequest(messages=messages, params=GREEDY)))
    assert got == hf_greedy(model, list(prompt), GREEDY.max_tokens)


def test_requests_sharing_a_prefix_go_to_the_prefill_replica_that_holds_it(ingress):
    """The first request leaves its prompt's blocks cached on one prefill replica; its KV events reach the router's
    index through Redis, and every later request with that prefix is sent there: the prefill group reports the
    shared blocks as cached each time. Routed blindly, four requests would all hit the holder 1 time in 16."""
    shared = [(31 * j) % 49152 for j in range(96)]  # six full blocks

    async def run():
        first = await final(ingress, GenerateRequest(prompt_token_ids=shared + [1, 2, 3], params=GREEDY))
        await asyncio.sleep(2.0)  # the events are published in the background and read by the router's follower
        later = [await final(ingress, GenerateRequest(prompt_token_ids=shared + [10 + i, 7], params=GREEDY))
                 for i in range(4)]
        return first, later

    first, later = asyncio.run(run())
    assert first.usage.cached_tokens == 0
    assert [out.usage.cached_tokens for out in later] == [96] * 4


def test_an_embedding_comes_from_the_prefill_pool_and_leaves_its_prefix_there_for_the_next_request(ingress, model):
    """Embedding a document computes its blocks on a prefill replica, which keeps them: the next request on that
    document (an embedding or a question) is sent there and finds them cached. Vectors and tokens equal HF's."""
    document = [(41 * j) % 49152 for j in range(96)]

    async def run():
        embedded = await ingress.embed.remote(EmbedRequest(prompt_token_ids=document + [5]))
        await asyncio.sleep(2.0)  # the index hears of the document's blocks
        again = await ingress.embed.remote(EmbedRequest(prompt_token_ids=document + [6], dimensions=16))
        asked = await final(ingress, GenerateRequest(prompt_token_ids=document + [7, 8], params=GREEDY))
        return embedded, again, asked

    embedded, again, asked = asyncio.run(run())
    assert [out.usage.cached_tokens for out in (embedded, again, asked)] == [0, 96, 96]
    torch.testing.assert_close(torch.tensor(embedded.embedding), hf_embedding(model, document + [5]), atol=2e-5,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(again.embedding),
                               torch.nn.functional.normalize(hf_embedding(model, document + [6])[:16], dim=0),
                               atol=2e-5, rtol=0)
    assert asked.outputs[0].token_ids == hf_greedy(model, document + [7, 8], GREEDY.max_tokens)


def test_a_different_cache_salt_gets_no_credit_for_anothers_prefix(ingress):
    shared = [(37 * j) % 49152 for j in range(64)]

    async def run():
        await final(ingress, GenerateRequest(prompt_token_ids=shared + [1], params=GREEDY, cache_salt="tenant-a"))
        await asyncio.sleep(2.0)
        return await final(ingress, GenerateRequest(prompt_token_ids=shared + [2], params=GREEDY,
                                                    cache_salt="tenant-b"))

    assert asyncio.run(run()).usage.cached_tokens == 0


def test_a_conversations_next_turn_is_prefilled_by_the_decode_group_that_holds_it(ingress, model):
    """Turn two repeats turn one's prompt and answer. The decode group holds both (it computed the answer), the
    prefill groups only the prompt, so the cost has the decode group prefill the two new tokens itself: no KV
    moves, and the tokens are still HF's."""
    turn1 = [(53 * j) % 49152 for j in range(96)]

    async def run():
        first = await final(ingress, GenerateRequest(prompt_token_ids=turn1, params=SamplingParams(
            max_tokens=64, temperature=0.0, ignore_eos=True)))
        turn2 = turn1 + first.outputs[0].token_ids + [5, 6]
        await asyncio.sleep(2.5)  # the KV events and the load reports reach Redis
        before = await pool("decode").stats.remote()
        second = await final(ingress, GenerateRequest(prompt_token_ids=turn2, params=GREEDY))
        return turn2, second, before, await pool("decode").stats.remote()

    turn2, second, before, after = asyncio.run(run())
    assert after.kv_bytes_received == before.kv_bytes_received
    assert second.usage.cached_tokens == 144  # 159 computed tokens of turn one: nine full blocks
    assert second.outputs[0].token_ids == hf_greedy(model, turn2, GREEDY.max_tokens)


def test_a_burst_on_one_prefix_spills_over_to_the_idle_replica(ingress, redis_url):
    """The prefix holder wins while its load costs less than the prefix saves; a burst of 40 requests, each with
    a long suffix of its own after that prefix, loads it with more work than the prefix saves (each request in
    flight there counts), so the router sends the rest to the idle replica, which then holds the prefix too."""
    shared = [(59 * j) % 49152 for j in range(96)]
    follower = KVIndexFollower(redis_url)

    def suffix(i: int) -> list[int]:
        return [(1000 + 7 * i + j) % 49152 for j in range(48)]

    async def run():
        await final(ingress, GenerateRequest(prompt_token_ids=shared + [1], params=GREEDY))
        await asyncio.sleep(2.0)
        await asyncio.gather(*(final(ingress, GenerateRequest(prompt_token_ids=shared + suffix(i), params=GREEDY))
                               for i in range(40)))
        await asyncio.sleep(2.0)
        await follower.start()
        holders = set(await _holders(follower, shared)) & set(replica_actors("prefill"))
        await follower.stop()
        return holders

    assert len(asyncio.run(run())) == 2


def test_bad_input_is_refused_with_the_field_named(ingress):
    with pytest.raises(InvalidRequestError, match="prompt"):
        asyncio.run(tokens(ingress, GenerateRequest(prompt="")))
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        asyncio.run(tokens(ingress, GenerateRequest(prompt_token_ids=[49152])))


def test_an_abandoned_stream_frees_every_block_on_both_pools(ingress):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def run():
        stream = ingress.options(stream=True).generate.remote(
            GenerateRequest(prompt_token_ids=list(range(100, 140)), params=long))
        async for _ in stream:
            break  # the first token arrived: the request is decoding, its KV moved
        stream.cancel()
        for _ in range(100):
            stats = [await pool(name).stats.remote() for name in ("prefill", "decode")]
            if all(s.num_free_blocks == s.num_blocks and s.num_running == 0 for s in stats):
                return stats
            await asyncio.sleep(0.1)
        return stats

    for stats in asyncio.run(run()):
        assert (stats.num_running, stats.num_waiting, stats.num_pinned, stats.num_receiving) == (0, 0, 0, 0)
        assert stats.num_free_blocks == stats.num_blocks


# The tests below restart or kill replicas, so they come last in this module.

def replica_actors(deployment: str) -> dict[str, object]:
    """The live replicas of a deployment by their unique id (the id their group publishes KV events under)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return {n["name"].rsplit("#", 1)[-1]: ray.get_actor(n["name"], namespace=n["namespace"]) for n in names
            if f"#{deployment}#" in n["name"] and n["name"].startswith("SERVE_REPLICA")}


async def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


def test_a_restarted_ingress_routes_by_the_index_it_rebuilds_from_redis(ingress):
    shared = [(41 * j) % 49152 for j in range(80)]  # five full blocks

    async def run():
        await final(ingress, GenerateRequest(prompt_token_ids=shared + [1], params=GREEDY))
        await asyncio.sleep(2.0)
        [old] = replica_actors("ingress").values()
        ray.kill(old, no_restart=True)
        await wait_for(lambda: _has_new_ingress(old))
        return [await final(ingress, GenerateRequest(prompt_token_ids=shared + [5 + i], params=GREEDY))
                for i in range(4)]

    assert [out.usage.cached_tokens for out in asyncio.run(run())] == [80] * 4


async def _has_new_ingress(old) -> bool:
    replicas = list(replica_actors("ingress").values())
    return bool(replicas) and replicas[0] != old


def test_a_killed_prefill_replica_leaves_the_index_and_serve_replaces_it(ingress, redis_url):
    shared = [(43 * j) % 49152 for j in range(64)]
    follower = KVIndexFollower(redis_url)

    async def run():
        await final(ingress, GenerateRequest(prompt_token_ids=shared + [1], params=GREEDY))
        await follower.start()
        await wait_for(lambda: _holders(follower, shared))
        [holder] = set(await _holders(follower, shared)) & set(replica_actors("prefill"))  # decode holds it too
        ray.kill(replica_actors("prefill")[holder], no_restart=True)
        served = await final(ingress, GenerateRequest(prompt_token_ids=shared + [2], params=GREEDY))
        await wait_for(lambda: _gone(follower, holder))  # its heartbeat expires
        await wait_for(lambda: _two_new_prefill_replicas(holder), timeout_s=120)
        await follower.stop()
        return served

    served = asyncio.run(run())
    assert served.finished and served.outputs[0].finish_reason == "length"


async def _holders(follower, tokens):
    hashes = hash_full_blocks(tokens, 16)
    return [group for group, blocks in follower.index.match(hashes).items() if blocks == len(hashes)]


async def _gone(follower, group) -> bool:
    return group not in follower.index.groups()


async def _two_new_prefill_replicas(dead) -> bool:
    replicas = replica_actors("prefill")
    return len(replicas) == 2 and dead not in replicas and all(
        s.status == "HEALTHY" for s in serve.status().applications["tandem-test"].deployments.values())
