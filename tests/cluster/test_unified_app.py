"""Unified mode (`disaggregate: false`): no prefill pool, the decode pool's replicas prefill and decode; the same
ingress and engine code, the same tokens, and a repeated prompt is served from the prefix cache."""

import asyncio

import pytest
from ray import serve

from cluster.app import build_app
from cluster.config import ClusterConfig
from router.ingress import GenerateRequest
from tests.hf_reference import hf_greedy
from workers.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_unified_cluster_gives_hfs_tokens_and_reuses_its_prefix_cache(tiny_model_factory, redis_url):
    model = str(tiny_model_factory("llama"))
    config = ClusterConfig(model=model, num_kv_blocks=64, num_cpus_per_rank=0.5, disaggregate=False,
                           redis_url=redis_url, grpc_port=16072)  # not 50051, in the ephemeral port range
    ingress = serve.run(build_app(config), name="tandem-unified", route_prefix=None)
    prompt = [(11 * j) % 49152 for j in range(40)]

    async def run():
        outs = []
        for _ in range(2):
            stream = ingress.options(stream=True).generate.remote(GenerateRequest(prompt_token_ids=prompt,
                                                                                  params=GREEDY))
            outs.append([o async for o in stream][-1])
        return outs

    try:
        first, second = asyncio.run(run())
        deployments = set(serve.status().applications["tandem-unified"].deployments)
    finally:
        serve.delete("tandem-unified")
    assert deployments == {"ingress", "decode"}
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == hf_greedy(model, prompt, 8)
    assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, 32)
