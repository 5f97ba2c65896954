"""A prefill engine and a decode engine in separate processes, the KV moving over a real gloo KV channel: the
decode side's greedy tokens equal a unified engine's, and a prompt whose prefix the decode side already holds
sends only the rest. Queues stand in for the control plane (Serve handles and actor calls in the cluster)."""

import multiprocessing as mp
import random

import pytest
import torch

from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(49152) for _ in range(40)]
    return [[rng.randrange(49152) for _ in range(23)], shared + [1, 2, 3], shared + [rng.randrange(49152)
                                                                                     for _ in range(30)]]


def _prefill_side(model: str, addresses, handoffs, plans) -> None:
    from workers.kv_transfer import KVChannel, listen

    torch.set_num_threads(1)
    engine = LLM(model, num_kv_blocks=64, progress=False).engine
    store, address = listen("127.0.0.1")
    addresses.put(address)
    channel = KVChannel(store, 0, torch.device("cpu"))
    for i, tokens in enumerate(_prompts()):
        engine.add_request(tokens, GREEDY, request_id=f"r{i}", prefill_only=True)
        done = []
        while not done:
            done = [out for out in engine.step() if out.finished]
        handoffs.put(done[0].handoff)
        plan = plans.get(timeout=60)
        channel.send(engine.runner.kv_caches, plan.src_block_ids).wait()
        engine.release_pinned(plan.request_id)
    handoffs.put(engine.block_manager.num_free_blocks)


def _decode_side(model: str, addresses, handoffs, plans, results) -> None:
    from workers.kv_transfer import KVChannel

    torch.set_num_threads(1)
    engine = LLM(model, num_kv_blocks=64, progress=False).engine
    channel = KVChannel.connect(addresses.get(timeout=60), torch.device("cpu"))
    for _ in _prompts():
        handoff = handoffs.get(timeout=60)
        plan = engine.add_prefilled_request(handoff, GREEDY)
        plans.put(plan)
        channel.recv(engine.runner.kv_caches, plan.dst_block_ids)
        out = engine.start_prefilled_request(handoff)
        while not out.finished:
            out = next((o for o in engine.step() if o.request_id == handoff.request_id), out)
        results.put((handoff.request_id, out.outputs[0].token_ids, len(plan.src_block_ids)))
    results.put(("free", handoffs.get(timeout=60), engine.block_manager.num_free_blocks))


def test_disaggregated_tokens_equal_unified_and_cached_blocks_are_not_sent(tiny_model_factory):
    model = str(tiny_model_factory("llama"))
    ctx = mp.get_context("spawn")
    addresses, handoffs, plans, results = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_prefill_side, args=(model, addresses, handoffs, plans)),
             ctx.Process(target=_decode_side, args=(model, addresses, handoffs, plans, results))]
    for p in procs:
        p.start()
    got = [results.get(timeout=180) for _ in range(len(_prompts()) + 1)]
    for p in procs:
        p.join(timeout=30)

    unified = LLM(model, num_kv_blocks=64, progress=False).generate(_prompts(), GREEDY)
    assert [tokens for _, tokens, _ in got[:-1]] == [o.outputs[0].token_ids for o in unified]
    assert [sent for _, _, sent in got[:-1]] == [2, 3, 3]  # the third prompt's two shared blocks stay home
    assert got[-1] == ("free", 64, 64)
