"""Worker groups as Ray actors: a tensor-parallel group's tokens equal HF's, a prefill group and a decode group
(real processes, the KV over a real gloo channel between them) equal a unified group, and when a rank dies the
requests still end and the group says it is unhealthy."""

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.hf_reference import hf_greedy
from workers.disaggregation import generate_disaggregated
from workers.engine.config import CacheConfig, EngineConfig, ModelConfig
from workers.engine.sampling_params import SamplingParams
from workers.group import WorkerGroup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(49152) for _ in range(36)]
    return [(shared if i % 2 else []) + [rng.randrange(49152) for _ in range(rng.randrange(5, 30))]
            for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def start(model: str, tp: int) -> WorkerGroup:
    config = EngineConfig(ModelConfig(model), CacheConfig(num_kv_blocks=64, kv_transfer_timeout_s=10))
    return WorkerGroup.start(config, tensor_parallel_size=tp, num_cpus_per_rank=0.5)


async def tokens_of(stream) -> list[int]:
    outs = [o async for o in stream]
    assert outs[-1].finished
    return outs[-1].outputs[0].token_ids


def assert_all_free(stats) -> None:
    assert (stats.num_running, stats.num_waiting, stats.num_pinned, stats.num_receiving) == (0, 0, 0, 0)
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("tp", [1, 2])
def test_prefill_group_to_decode_group_equals_hf_and_frees_everything(model, tp):
    """Each group's rank r sends to / receives from the other's rank r; at TP=2 each moves its own KV heads."""
    prefill, decode = start(model, tp), start(model, tp)
    batch = prompts(4, seed=tp)
    try:
        async def run():
            unified = [await tokens_of(decode.generate(p, GREEDY)) for p in batch[:1]]
            split = await asyncio.gather(*(tokens_of(generate_disaggregated(prefill, decode, p, GREEDY))
                                           for p in batch))
            return unified, split, await prefill.stats(), await decode.stats()

        unified, split, p_stats, d_stats = asyncio.run(run())
    finally:
        prefill.shutdown()
        decode.shutdown()
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in batch]
    assert unified == expected[:1]
    assert split == expected
    assert_all_free(p_stats)
    assert_all_free(d_stats)
    assert p_stats.num_kv_channels == d_stats.num_kv_channels == 1
    assert d_stats.num_kv_transfer_failures == 0 and d_stats.kv_bytes_received > 0


def test_killing_the_prefill_actor_after_prefill_makes_the_decode_group_recompute(model):
    prefill, decode = start(model, 1), start(model, 1)
    tokens = prompts(1, seed=7)[0]
    try:
        async def run():
            await tokens_of(generate_disaggregated(prefill, decode, tokens, GREEDY))  # the channel is open
            handoff = await prefill.prefill(tokens, GREEDY)
            ray.kill(prefill.ranks[0])
            out = await tokens_of(decode.generate_prefilled(handoff, GREEDY, prefill))
            return out, await decode.stats()

        out, d_stats = asyncio.run(run())
        with pytest.raises(ray.exceptions.RayActorError):
            asyncio.run(prefill.check_health())
        asyncio.run(decode.check_health())
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert out == hf_greedy(model, tokens, GREEDY.max_tokens)
    assert d_stats.num_kv_transfer_failures == 1
    assert_all_free(d_stats)


def test_a_healthy_group_answers_with_its_stats_and_one_whose_follower_died_is_unhealthy(model):
    group = start(model, 2)
    try:
        stats = asyncio.run(group.check_health())
        assert stats.num_blocks > 0 and stats.num_free_blocks == stats.num_blocks
        ray.kill(group.ranks[1])
        with pytest.raises(ray.exceptions.RayActorError):
            asyncio.run(_wait_unhealthy(group))
    finally:
        group.shutdown()


async def _wait_unhealthy(group: WorkerGroup) -> None:
    for _ in range(50):
        await group.check_health()
        await asyncio.sleep(0.1)


def test_32_concurrent_requests_across_groups_with_random_cancels_leak_nothing(model):
    """Real processes on both sides: cancelled streams abort on whichever group holds the request."""
    prefill, decode = start(model, 1), start(model, 1)
    batch = prompts(32, seed=11)
    rng = random.Random(12)
    delays = [rng.choice([None, None, 0.0, 0.1, 0.3, 0.6]) for _ in batch]

    async def one(tokens, delay):
        task = asyncio.create_task(tokens_of(generate_disaggregated(prefill, decode, tokens, GREEDY)))
        if delay is not None:
            await asyncio.sleep(delay)
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return None

    async def run():
        results = await asyncio.gather(*(one(p, d) for p, d in zip(batch, delays)))
        for _ in range(50):  # aborts of cancelled streams are fire-and-forget: wait until both groups are idle
            p_stats, d_stats = await prefill.stats(), await decode.stats()
            if p_stats.num_free_blocks == p_stats.num_blocks and d_stats.num_free_blocks == d_stats.num_blocks:
                break
            await asyncio.sleep(0.1)
        return results, p_stats, d_stats

    try:
        results, p_stats, d_stats = asyncio.run(run())
    finally:
        prefill.shutdown()
        decode.shutdown()
    done = [i for i, r in enumerate(results) if r is not None]
    assert len(done) >= sum(d is None for d in delays)
    assert [results[i] for i in done] == [hf_greedy(model, batch[i], GREEDY.max_tokens) for i in done]
    assert_all_free(p_stats)
    assert_all_free(d_stats)
    assert p_stats.num_kv_channels == d_stats.num_kv_channels == 1


def test_a_ranks_info_lines_reach_the_workers_log_file(model):
    """A rank is a plain Ray actor, where nothing configures logging: the engine's INFO lines (the KV cache it
    got, that it is ready) must still reach the file Ray keeps the worker's stderr in."""
    group = start(model, 1)
    try:
        pid = ray.get(group.ranks[0].__ray_call__.remote(lambda _: os.getpid()))
    finally:
        group.shutdown()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    text = "".join(f.read_text() for f in logs.glob(f"worker-*-{pid}.err"))
    assert "INFO workers.engine.model_runner: KV cache: 64 blocks" in text
    assert "INFO workers.engine.llm_engine: engine ready" in text


def test_a_pool_replica_process_loads_neither_torch_nor_transformers():
    """A pool replica only drives its ranks: its process starts without the ML stack (seconds of imports), so a
    replica added under load is ready sooner."""
    code = "import sys, workers.server; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
