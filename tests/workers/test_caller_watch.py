"""A pool replica's watch on its callers (workers/caller_watch.py), with real Ray actors as the callers: the
requests of a caller that dies are aborted, those of a live one never are, and nothing is watched once a caller's
requests are done."""

import asyncio

import pytest
import ray

from workers.caller_watch import Caller, CallerWatch

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0)
class Ingress:
    def caller(self) -> Caller:
        return Caller.current()


def test_outside_an_actor_there_is_no_caller_to_watch():
    assert Caller.current() is None


def test_a_dead_callers_requests_are_aborted_and_a_live_ones_are_not():
    async def run() -> tuple[list[str], dict, dict]:
        aborted: list[str] = []

        async def abort(request_id: str) -> None:
            aborted.append(request_id)

        watch = CallerWatch(abort, period_s=0.1)
        doomed, alive = Ingress.remote(), Ingress.remote()
        doomed_caller, alive_caller = await doomed.caller.remote(), await alive.caller.remote()
        async with watch.watching(doomed_caller, "a"), watch.watching(doomed_caller, "b"), \
                watch.watching(alive_caller, "c"):
            await asyncio.sleep(0.5)
            assert aborted == []
            ray.kill(doomed)
            for _ in range(100):
                if aborted:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.3)  # the live caller's watcher sees it has no requests left
        ray.kill(alive)
        return aborted, watch._watchers, watch._requests

    aborted, watchers, requests = asyncio.run(run())
    assert aborted == ["a", "b"]
    assert watchers == {} and requests == {}
