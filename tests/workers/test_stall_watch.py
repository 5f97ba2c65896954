"""A replica's watch on its group's steps (workers/stall_watch.py), on real worker groups of the tiny model: a
group that keeps ending steps is never ended however long its requests run, and one with a rank that hangs is
ended within the timeout, so its stream fails instead of waiting forever. The hang is the operating system's:
SIGSTOP of rank 0 (nothing answers) or of a follower (rank 0 answers, but its step waits in a collective)."""

import asyncio
import os
import signal
import time

import pytest
import ray

from workers.engine.config import CacheConfig, EngineConfig, ModelConfig
from workers.engine.sampling_params import SamplingParams
from workers.group import WorkerGroup
from workers.stall_watch import StallWatch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

TIMEOUT_S, PERIOD_S = 3.0, 0.5
PROMPT = list(range(1, 40))
LONG = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)


def start(tiny_model_factory, tp: int) -> WorkerGroup:
    config = EngineConfig(ModelConfig(str(tiny_model_factory("llama"))), CacheConfig(num_kv_blocks=64))
    return WorkerGroup.start(config, tensor_parallel_size=tp, num_cpus_per_rank=0.5)


def watch(group: WorkerGroup) -> StallWatch:
    return StallWatch(group.load, group.end_ranks, TIMEOUT_S, PERIOD_S)


def test_a_group_that_keeps_stepping_is_never_ended(tiny_model_factory):
    """Requests run back to back for several timeouts; every step in them is short."""
    group = start(tiny_model_factory, 1)
    stalls = watch(group)

    async def run() -> list[int]:
        lengths = []
        deadline = time.monotonic() + 3 * TIMEOUT_S
        async with stalls.watching():
            while time.monotonic() < deadline:
                outs = [o async for o in group.generate(PROMPT, LONG)]
                lengths.append(len(outs[-1].outputs[0].token_ids))
        return lengths

    try:
        assert set(asyncio.run(run())) == {LONG.max_tokens}
        assert not stalls.stalled
        asyncio.run(group.check_health())
        assert asyncio.run(group.load())["busy_s"] == 0.0  # idle: waiting for work is not a step
    finally:
        group.shutdown()


@pytest.mark.parametrize("tp, stopped", [(1, 0), (2, 1)], ids=["rank 0 stopped", "follower stopped"])
def test_a_group_whose_rank_hangs_is_ended_and_its_stream_fails(tiny_model_factory, tp, stopped):
    group = start(tiny_model_factory, tp)
    stalls = watch(group)
    pid = ray.get(group.ranks[stopped].__ray_call__.remote(lambda _: os.getpid()))

    async def run() -> tuple[BaseException | None, float]:
        received, stopped_at = 0, float("nan")
        async with stalls.watching():
            try:
                async for _ in group.generate(PROMPT, LONG):
                    received += 1
                    if received == 5:
                        os.kill(pid, signal.SIGSTOP)
                        stopped_at = time.monotonic()
            except Exception as e:
                return e, time.monotonic() - stopped_at
        return None, time.monotonic() - stopped_at

    try:
        error, after = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S + 60))
        assert isinstance(error, ray.exceptions.RayActorError), error
        assert stalls.stalled
        # Not before the timeout: the hung step began a few milliseconds before the stop, hence the 0.1 s.
        assert TIMEOUT_S - 0.1 <= after < TIMEOUT_S + PERIOD_S + 10
    finally:
        group.shutdown()
