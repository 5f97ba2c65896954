"""Disaggregation through the async interface servers use: a prefill engine and a decode engine, the KV moving
over a real gloo channel between them (both in this process; tests/workers/test_group.py runs them as separate
Ray actors). Whatever goes wrong with a transfer, every request ends, with the same tokens as a unified engine
where it completes, and both sides end with every block free and nothing pinned."""

import asyncio
import dataclasses
import random

import pytest

from workers.disaggregation import generate_disaggregated
from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.config import CacheConfig, EngineConfig, ModelConfig
from workers.engine.errors import RequestFailedError
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams
from workers.kv_commands import TransferCommand

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NUM_BLOCKS = 256


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts, half of them sharing a 40-token prefix (so the decode side's prefix cache gets hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(49152) for _ in range(40)]
    return [(shared if i % 2 else []) + [rng.randrange(49152) for _ in range(rng.randrange(5, 40))]
            for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def make_engine(model: str, **cache) -> AsyncLLMEngine:
    cache = dict(num_kv_blocks=NUM_BLOCKS, kv_transfer_timeout_s=10) | cache
    return AsyncLLMEngine.from_config(EngineConfig(ModelConfig(model), CacheConfig(**cache)))


@pytest.fixture
def pair(model):
    prefill, decode = make_engine(model), make_engine(model)
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


def unified(model: str, batch: list[list[int]]) -> list[list[int]]:
    llm = LLM(model, num_kv_blocks=NUM_BLOCKS, progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)]


async def disaggregated(prefill, decode, tokens, request_id, source=None):
    if source is None:
        outs = [o async for o in generate_disaggregated(prefill, decode, tokens, GREEDY, request_id)]
    else:
        handoff = await prefill.prefill(tokens, GREEDY, request_id=request_id)
        outs = [o async for o in decode.generate_prefilled(handoff, GREEDY, source)]
    assert outs[-1].finished
    return outs


def assert_all_free(stats) -> None:
    assert (stats.num_running, stats.num_waiting, stats.num_pinned, stats.num_receiving) == (0, 0, 0, 0)
    assert stats.num_free_blocks == stats.num_blocks


class TruncatingSource:
    """Sends one block fewer than the decode side expects. A fake: the real channel has no way to deliver a
    wrong message on demand, and a transfer cut short is exactly what this makes the receiver see."""

    def __init__(self, prefill: AsyncLLMEngine):
        self.prefill = prefill

    async def send_kv(self, command):
        if isinstance(command, TransferCommand):
            command = dataclasses.replace(command, block_ids=command.block_ids[1:])
        return await self.prefill.send_kv(command)

    async def release(self, request_id):
        await self.prefill.release(request_id)

    async def check_health(self):
        await self.prefill.check_health()


class GoneSource:
    """A prefill group that stopped answering after the prefill (Ray reports a dead actor the same way: the call
    raises). Killing a real actor is tests/workers/test_group.py."""

    def __init__(self, prefill: AsyncLLMEngine):
        self.prefill = prefill

    async def send_kv(self, command):
        raise ConnectionError("prefill group is gone")

    async def release(self, request_id):
        raise ConnectionError("prefill group is gone")

    async def check_health(self):
        raise ConnectionError("prefill group is gone")


def test_streamed_tokens_equal_unified_and_both_sides_end_clean(pair, model):
    prefill, decode = pair
    batch = prompts(4)

    async def run():
        outs = [await disaggregated(prefill, decode, p, f"r{i}") for i, p in enumerate(batch)]
        return outs, await prefill.stats(), await decode.stats()

    outs, p_stats, d_stats = asyncio.run(run())
    assert [o[-1].outputs[0].token_ids for o in outs] == unified(model, batch)
    for stream in outs:
        assert "".join(o.outputs[0].delta_text for o in stream) == stream[-1].outputs[0].text
    assert_all_free(p_stats)
    assert_all_free(d_stats)
    assert p_stats.num_kv_channels == d_stats.num_kv_channels == 1
    assert d_stats.kv_bytes_received == p_stats.kv_bytes_sent > 0
    assert d_stats.num_kv_transfer_failures == 0


def test_with_small_caches_and_host_tiers_both_sides_copy_back_prefixes_and_give_the_unified_tokens(model):
    """Four documents asked about twice, one request at a time, on caches of 8 blocks: each request evicts the one
    before into the host tier. The decode side saves what it evicts before the received KV overwrites it, then
    copies the documents back rather than receiving them again; the prefill side copies them back rather than
    computing them again."""
    prefill, decode = (make_engine(model, num_kv_blocks=8, kv_offload_gb=0.01) for _ in range(2))
    rng = random.Random(5)
    docs = [[rng.randrange(49152) for _ in range(48)] for _ in range(4)]
    batch = [doc + [rng.randrange(49152) for _ in range(7)] for _ in range(2) for doc in docs]

    async def run():
        outs = [await disaggregated(prefill, decode, p, f"r{i}") for i, p in enumerate(batch)]
        return outs, await prefill.stats(), await decode.stats()

    try:
        outs, p_stats, d_stats = asyncio.run(run())
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert [o[-1].outputs[0].token_ids for o in outs] == unified(model, batch)
    assert p_stats.num_reloaded_blocks >= 9 and d_stats.num_reloaded_blocks >= 9
    assert_all_free(p_stats)
    assert_all_free(d_stats)


def test_seeded_sampling_and_logprobs_continue_across_the_handoff_as_in_one_engine(pair, model):
    """The first token (and its logprobs) comes from the prefill group, the rest from the decode group, whose
    generator skips the draw the prefill group made."""
    prefill, decode = pair
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=42, logprobs=3, ignore_eos=True)
    tokens = prompts(1, seed=9)[0]

    async def run():
        return [o async for o in generate_disaggregated(prefill, decode, tokens, params, "seeded")][-1]

    split = asyncio.run(run()).outputs[0]
    whole = LLM(model, num_kv_blocks=NUM_BLOCKS, progress=False).generate([tokens], params)[0].outputs[0]
    assert split.token_ids == whole.token_ids
    assert len(split.logprobs) == len(whole.logprobs) == 12
    for got, want in zip(split.logprobs, whole.logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[t] - want[t]) < 1e-4 for t in want)


def test_a_transfer_cut_short_is_recomputed_and_the_next_one_uses_a_rebuilt_channel(pair, model):
    prefill, decode = pair
    batch = prompts(2, seed=1)

    async def run():
        broken = await disaggregated(prefill, decode, batch[0], "broken", TruncatingSource(prefill))
        after_failure = await decode.stats()
        healthy = await disaggregated(prefill, decode, batch[1], "healthy")
        return broken, healthy, after_failure, await prefill.stats(), await decode.stats()

    broken, healthy, after_failure, p_stats, d_stats = asyncio.run(run())
    expected = unified(model, batch)
    assert broken[-1].outputs[0].token_ids == expected[0]
    assert healthy[-1].outputs[0].token_ids == expected[1]
    assert after_failure.num_kv_transfer_failures == 1 and after_failure.kv_bytes_received == 0
    assert d_stats.num_kv_transfer_failures == 1 and d_stats.kv_bytes_received > 0  # the second one moved KV
    assert_all_free(p_stats)
    assert_all_free(d_stats)


def test_a_prefill_group_that_is_gone_makes_the_decode_side_recompute(pair, model):
    prefill, decode = pair
    tokens = prompts(1, seed=2)[0]

    async def run():
        await disaggregated(prefill, decode, tokens, "healthy")  # the channel is open when the group goes
        out = await disaggregated(prefill, decode, tokens, "orphan", GoneSource(prefill))
        return out, await decode.stats()

    out, d_stats = asyncio.run(run())
    assert out[-1].outputs[0].token_ids == unified(model, [tokens])[0]
    assert d_stats.num_kv_transfer_failures == 1
    assert_all_free(d_stats)


def test_an_expired_lease_frees_the_blocks_by_itself_and_the_late_decode_recomputes(model):
    prefill, decode = make_engine(model, kv_lease_s=0.3), make_engine(model)
    tokens = prompts(1, seed=3)[0]

    async def run():
        handoff = await prefill.prefill(tokens, GREEDY, request_id="late")
        pinned = await prefill.stats()
        await asyncio.sleep(1.0)  # the prefill engine is idle: nothing but the lease timer can free the blocks
        expired = await prefill.stats()
        outs = [o async for o in decode.generate_prefilled(handoff, GREEDY, prefill)]
        return pinned, expired, outs, await decode.stats()

    try:
        pinned, expired, outs, d_stats = asyncio.run(run())
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert pinned.num_pinned == 1 and pinned.num_free_blocks < pinned.num_blocks
    assert pinned.num_busy_seqs == 1  # nothing runs, but the group holds the KV until a decode group pulls it
    assert_all_free(expired)
    assert outs[-1].outputs[0].token_ids == unified(model, [tokens])[0]
    assert d_stats.num_kv_transfer_failures == 1
    assert_all_free(d_stats)


def test_32_concurrent_requests_with_random_aborts_leak_no_blocks_pins_or_channels(pair, model):
    prefill, decode = pair
    batch = prompts(32, seed=4)
    rng = random.Random(5)
    # Each request is cancelled after a random delay, or not at all: in prefill, around the transfer, or in decode.
    deadlines = [rng.choice([None, None, 0.0, 0.05, 0.2, 0.5]) for _ in batch]

    async def one(i, tokens):
        task = asyncio.create_task(disaggregated(prefill, decode, tokens, f"c{i}"))
        if deadlines[i] is None:
            return await task
        await asyncio.sleep(deadlines[i])
        task.cancel()
        try:
            return await task
        except (asyncio.CancelledError, RequestFailedError):
            return None

    async def run():
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
        # Aborts are commands that run in order on each engine thread; a stats call after them sees their effect.
        await asyncio.sleep(0.1)
        return results, await prefill.stats(), await decode.stats()

    results, p_stats, d_stats = asyncio.run(run())
    expected = unified(model, batch)
    finished = [i for i, r in enumerate(results) if r is not None]
    assert all(deadlines[i] is not None for i in range(len(batch)) if results[i] is None)
    assert [results[i][-1].outputs[0].token_ids for i in finished] == [expected[i] for i in finished]
    assert len(finished) >= sum(d is None for d in deadlines)
    assert_all_free(p_stats)
    assert_all_free(d_stats)
    assert p_stats.num_kv_channels == d_stats.num_kv_channels == 1


def test_a_prompt_arriving_at_a_full_decode_cache_waits_for_room_instead_of_failing(model):
    """8 blocks of 16 tokens, 7 of them pinned by a 100-token prompt: a 40-token prompt's KV has nowhere to go
    until they are released. Its handoff waits for that, its KV kept for it past the prefill engine's claim window
    (generate_disaggregated claims it), and then decodes as in one engine; a caller that leaves while it waits ends
    it, and both sides end clean."""
    prefill, decode = make_engine(model, kv_claim_s=0.2), make_engine(model, num_kv_blocks=8)
    rng = random.Random(6)
    holder, waiting, leaving = ([rng.randrange(49152) for _ in range(n)] for n in (100, 40, 40))

    async def run():
        await decode.prefill(holder, GREEDY, request_id="holder")
        leaver = asyncio.create_task(disaggregated(prefill, decode, leaving, "leaver"))
        waiter = asyncio.create_task(disaggregated(prefill, decode, waiting, "waiter"))
        await asyncio.sleep(0.5)
        full = await decode.stats()
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        await decode.release("holder")
        outs = await waiter
        await asyncio.sleep(0.1)
        return full, outs, await prefill.stats(), await decode.stats()

    try:
        full, outs, p_stats, d_stats = asyncio.run(run())
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert (full.num_free_blocks, full.num_running, full.num_receiving) == (1, 0, 0)
    assert outs[-1].outputs[0].token_ids == unified(model, [waiting])[0]
    assert d_stats.num_kv_transfer_failures == 0
    assert_all_free(p_stats)
    assert_all_free(d_stats)
