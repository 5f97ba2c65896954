"""Faults inside a worker group fail its requests cleanly instead of hanging them, and its health says so.

Real processes: the groups are Ray actors. A SIGKILL is a real fault. A forward pass that raises cannot be
caused from outside on a healthy model, so those tests replace one rank's `execute` in its own process (through
Ray's `__ray_call__`) with one that raises; that is the only fake here.
"""

import asyncio
import os
import signal
import time

import pytest
import ray

from tests.hf_reference import hf_greedy
from tests.workers.test_group import GREEDY, assert_all_free, prompts, start, tokens_of
from workers.engine.errors import RequestFailedError
from workers.group import WorkerGroup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

LONG = GREEDY.__class__(max_tokens=400, temperature=0.0, ignore_eos=True)
FAILED_FAST_S = 15  # a failed rank must end its group's requests long before any collective timeout (300 s)


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def fail_next_step(worker) -> None:
    """Runs inside a rank's process: its next forward pass raises, as a kernel or memory error would. The ids of
    the requests in that step are kept on the worker (`failed_step`)."""
    runner = worker.engine.engine.runner if worker.engine is not None else worker.follower.runner
    execute = runner.execute

    def failing(batch, *args, **kwargs):
        runner.execute = execute
        worker.failed_step = [seq.request_id for seq, _ in batch]
        raise RuntimeError("injected forward-pass failure")

    runner.execute = failing


def inject_step_failure(group: WorkerGroup, rank: int) -> None:
    ray.get(group.ranks[rank].__ray_call__.remote(fail_next_step))


async def outcome(stream) -> str:
    try:
        await tokens_of(stream)
        return "ok"
    except RequestFailedError:
        return "failed"
    except ray.exceptions.RayActorError:
        return "rank died"


def test_a_forward_error_fails_that_steps_requests_and_the_group_serves_on(model):
    """At TP=1 nothing is out of step after a failed forward: exactly the requests of that step fail, and the
    group serves the next ones."""
    group = start(model, 1)
    batch = prompts(4, seed=21)
    ids = [f"r{i}" for i in range(3)]
    try:
        async def run():
            inject_step_failure(group, 0)
            ended = await asyncio.gather(*(outcome(group.generate(p, GREEDY, rid)) for p, rid in zip(batch, ids)))
            after = await tokens_of(group.generate(batch[3], GREEDY))
            await group.check_health()
            return ended, after, await group.stats()

        ended, after, stats = asyncio.run(run())
        in_failed_step = ray.get(group.ranks[0].__ray_call__.remote(lambda worker: worker.failed_step))
    finally:
        group.shutdown()
    assert in_failed_step
    assert sorted(rid for rid, o in zip(ids, ended) if o == "failed") == sorted(in_failed_step)
    assert all(o == "ok" for rid, o in zip(ids, ended) if rid not in in_failed_step)
    assert after == hf_greedy(model, batch[3], GREEDY.max_tokens)
    assert_all_free(stats)


@pytest.mark.parametrize("rank", [0, 1], ids=["rank 0 fails", "follower fails"])
def test_a_failed_rank_puts_its_tensor_parallel_group_out_of_service_at_once(model, rank):
    """At TP=2 a failed step leaves the ranks' collectives out of step: every request the group holds fails
    within seconds, new ones are refused, and the health check fails so Serve replaces the group."""
    group = start(model, 2)
    batch = prompts(3, seed=22)
    try:
        async def run():
            running = [asyncio.create_task(outcome(group.generate(p, LONG))) for p in batch[:2]]
            await asyncio.sleep(1.0)  # both are decoding
            started = time.monotonic()
            inject_step_failure(group, rank)
            ended = await asyncio.wait_for(asyncio.gather(*running), FAILED_FAST_S)
            took = time.monotonic() - started
            refused = await outcome(group.generate(batch[2], GREEDY))
            return ended, took, refused

        ended, took, refused = asyncio.run(run())
        with pytest.raises((RuntimeError, ray.exceptions.RayActorError)):
            asyncio.run(group.check_health())
    finally:
        group.shutdown()
    assert all(o in ("failed", "rank died") for o in ended), ended
    assert took < FAILED_FAST_S
    assert refused in ("failed", "rank died")


def test_a_sigkilled_follower_ends_its_groups_requests_within_seconds(model):
    group = start(model, 2)
    batch = prompts(2, seed=23)
    try:
        async def run():
            running = [asyncio.create_task(outcome(group.generate(p, LONG))) for p in batch]
            await asyncio.sleep(1.0)
            pid = ray.get(group.ranks[1].__ray_call__.remote(lambda worker: os.getpid()))
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            ended = await asyncio.wait_for(asyncio.gather(*running), FAILED_FAST_S)
            return ended, time.monotonic() - started

        ended, took = asyncio.run(run())
        with pytest.raises((RuntimeError, ray.exceptions.RayActorError)):
            asyncio.run(group.check_health())
    finally:
        group.shutdown()
    assert ended == ["failed", "failed"]
    assert took < FAILED_FAST_S
