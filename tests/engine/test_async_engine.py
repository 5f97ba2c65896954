"""The async engine streams deltas that add up to the final text, serves requests concurrently, and frees the
blocks of a request whose client goes away."""

import asyncio
import pickle
import re

import pytest

from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from workers.engine.errors import InvalidRequestError, RequestFailedError
from workers.engine.llm import LLM
from workers.engine.outputs import DeltaAssembler
from workers.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(smollm2_path):
    eng = AsyncLLMEngine.from_config(EngineConfig(ModelConfig(str(smollm2_path)), CacheConfig(num_kv_blocks=256)))
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params, **kw):
    return [out async for out in engine.generate(prompt, params, **kw)]


def test_stream_deltas_concatenate_to_the_final_text(engine):
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=("\n\n",))
    outs = asyncio.run(collect(engine, "def fibonacci(n):", params))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text
    assert sum(len(o.outputs[0].delta_token_ids) for o in outs) == len(outs[-1].outputs[0].token_ids)


def test_a_stream_sent_as_deltas_is_put_back_together_exactly_and_its_messages_stay_small(engine):
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    outs = asyncio.run(collect(engine, "Once upon a time, in a land far away,", params))
    deltas = [out.as_delta(first=i == 0) for i, out in enumerate(outs)]
    sizes = [len(pickle.dumps(d)) for d in deltas[1:-1]]
    assert max(sizes) < 1.5 * min(sizes)  # each carries one token, however long the reply has grown
    assembler = DeltaAssembler()
    assert [assembler.add(pickle.loads(pickle.dumps(d))) for d in deltas] == outs


def test_concurrent_requests_match_the_offline_api(engine, smollm2_path):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["Tell me a joke.", "The weather today is", "1, 2, 3, 4,", "Python is a"]

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    streamed = [outs[-1].outputs[0].token_ids for outs in asyncio.run(all_at_once())]
    offline = LLM(str(smollm2_path), num_kv_blocks=256, progress=False).generate(prompts, params)
    assert streamed == [o.outputs[0].token_ids for o in offline]


def test_bad_input_raises_before_streaming_and_the_engine_keeps_serving(engine):
    with pytest.raises(InvalidRequestError):
        asyncio.run(collect(engine, [], SamplingParams()))
    outs = asyncio.run(collect(engine, "Hello", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))
    assert len(outs[-1].outputs[0].token_ids) == 3


def test_a_grammar_that_takes_seconds_to_compile_holds_up_only_its_own_request(engine):
    # Compiling this regex against the vocabulary takes seconds; the engine must step the others meanwhile.
    structured = SamplingParams(max_tokens=4, temperature=0.0, structured_output={"regex": "(ab|cd)" * 4000})
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    finished = []

    async def run(name, params):
        outs = await collect(engine, "Spell something:", params)
        finished.append(name)
        return outs[-1].outputs[0]

    async def structured_first():
        return await asyncio.gather(run("structured", structured), run("plain", plain))

    held_to_regex, free = asyncio.run(structured_first())
    assert finished == ["plain", "structured"]
    assert re.fullmatch("(ab|cd)*[ac]?", held_to_regex.text) and len(held_to_regex.token_ids) == 4
    assert len(free.token_ids) == 4


def test_client_that_walks_away_mid_stream_frees_its_blocks(engine):
    async def walk_away():
        stream = engine.generate("Count to one hundred:", SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()
        for _ in range(100):
            stats = await engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                return stats
            await asyncio.sleep(0.02)
        return stats

    stats = asyncio.run(walk_away())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks


def test_explicit_abort_ends_the_stream_with_reason_abort(engine):
    async def abort_after_first_token():
        outs = []
        async for out in engine.generate("Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True),
                                         request_id="to-abort"):
            outs.append(out)
            if len(outs) == 1:
                await engine.abort("to-abort")
        return outs

    outs = asyncio.run(abort_after_first_token())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 500


def test_an_abort_that_overtakes_its_request_keeps_the_request_from_starting(engine):
    """A caller that leaves sends its abort as a separate call, which can reach the engine first: the request
    must then never start, or its blocks would stay pinned for a whole lease."""
    async def abort_then_prefill():
        await engine.abort("overtaken")
        with pytest.raises(RequestFailedError, match="cancelled before it started"):
            await engine.prefill("Once upon a time", SamplingParams(max_tokens=4), request_id="overtaken")
        # Remembered once: the same id can be used again afterwards.
        handoff = await engine.prefill("Once upon a time", SamplingParams(max_tokens=4), request_id="overtaken")
        await engine.release(handoff.request_id)
        return await engine.stats()

    stats = asyncio.run(abort_then_prefill())
    assert stats.num_pinned == 0 and stats.num_free_blocks == stats.num_blocks


def test_a_storm_of_cancellations_at_every_phase_leaks_no_blocks(engine):
    async def one(i: int):
        # Long prompts keep some requests queued or mid-prefill when they are cancelled.
        prompt = [100 + i] * (20 + 37 * (i % 9))
        stream = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= i % 4:
                break
        await stream.aclose()

    async def storm():
        tasks = [asyncio.create_task(one(i)) for i in range(24)]
        await asyncio.sleep(0.05)
        for task in tasks[::3]:
            task.cancel()  # some are still waiting to be admitted, some mid-prefill
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):
            stats = await engine.stats()
            if stats.num_running == stats.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        return stats

    stats = asyncio.run(storm())
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks


def test_stats_count_prompt_tokens_and_what_the_prefix_cache_supplied(engine):
    prompt = list(range(1000, 1040))  # two full blocks and 8 tokens
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    before = asyncio.run(engine.stats())
    for _ in range(2):
        asyncio.run(collect(engine, prompt, params))
    after = asyncio.run(engine.stats())
    assert after.num_finished - before.num_finished == 2
    assert after.num_prompt_tokens - before.num_prompt_tokens == 80
    assert after.num_cached_prompt_tokens - before.num_cached_prompt_tokens == 32  # the second one's two blocks


def test_a_long_step_whose_layers_keep_finishing_never_reads_as_stalled(smollm2_path):
    """busy_s, what a replica ends its group on (workers/stall_watch.py), counts from the step's start or from the
    model's last finished layer: a 1500-token prompt prefilled in one step runs long, yet never goes long without
    progress."""
    config = EngineConfig(ModelConfig(str(smollm2_path)), CacheConfig(num_kv_blocks=256),
                          SchedulerConfig(max_num_batched_tokens=4096))
    eng = AsyncLLMEngine.from_config(config)
    prompt = [(7 * i) % 40000 + 100 for i in range(1500)]
    samples = []

    async def run():
        task = asyncio.create_task(collect(eng, prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
        while not task.done():
            samples.append(eng.busy_s())
            await asyncio.sleep(0.005)
        await task
        return await eng.stats()

    try:
        stats = asyncio.run(run())
    finally:
        eng.shutdown()
    assert stats.num_steps == 1  # the whole prompt, and the first token, in one step
    assert 0 < max(samples) < stats.step_seconds / 4
