"""Several requests' streams answered as one (an OpenAI request's n choices): items interleave as they arrive,
one failure fails the whole at once, and however it ends, every stream is closed (which is what cancels a
cluster request and frees its blocks)."""

import asyncio

import pytest

from router.streams import first_of_each, merged


class Stream:
    """An async generator of `items`, one every `every_s` seconds, that records whether it was closed."""

    def __init__(self, items: list, every_s: float = 0.0, fail_after: int | None = None):
        self.items, self.every_s, self.fail_after = items, every_s, fail_after
        self.closed = False
        self.iterator = self._run()

    async def _run(self):
        try:
            for i, item in enumerate(self.items):
                await asyncio.sleep(self.every_s)
                if i == self.fail_after:
                    raise ValueError(f"failed at {item}")
                yield item
        finally:
            self.closed = True


def test_merged_yields_every_item_of_every_stream_as_it_arrives():
    async def scenario():
        slow, fast = Stream(["s0", "s1"], every_s=0.2), Stream(["f0", "f1", "f2"], every_s=0.01)
        return [item async for item in merged([slow.iterator, fast.iterator])], slow, fast

    items, slow, fast = asyncio.run(scenario())
    assert items == [(1, "f0"), (1, "f1"), (1, "f2"), (0, "s0"), (0, "s1")]
    assert slow.closed and fast.closed


def test_a_consumer_that_stops_early_closes_every_stream():
    async def scenario():
        streams = [Stream(list(range(100)), every_s=0.01) for _ in range(3)]
        rest = merged([s.iterator for s in streams])
        async for i, item in rest:
            if item == 2:
                break
        await rest.aclose()
        return streams

    assert all(s.closed for s in asyncio.run(scenario()))


def test_a_stream_that_fails_midway_fails_the_merge_and_closes_the_others():
    async def scenario():
        good, bad = Stream(list(range(100)), every_s=0.01), Stream([0, 1, 2], every_s=0.01, fail_after=1)
        seen = []
        with pytest.raises(ValueError, match="failed at 1"):
            async for i, item in merged([good.iterator, bad.iterator]):
                seen.append((i, item))
        return seen, good, bad

    seen, good, bad = asyncio.run(scenario())
    assert (1, 0) in seen and good.closed and bad.closed


def test_first_of_each_awaits_the_first_items_side_by_side():
    async def scenario():
        streams = [Stream([f"{i}-first", f"{i}-second"], every_s=0.1) for i in range(4)]
        started = asyncio.get_running_loop().time()
        firsts = await first_of_each([s.iterator for s in streams])
        return firsts, asyncio.get_running_loop().time() - started

    firsts, took = asyncio.run(scenario())
    assert firsts == ["0-first", "1-first", "2-first", "3-first"]
    assert took < 0.3  # together, not one after another (0.4 s)


def test_one_failing_first_fails_at_once_and_cancels_the_slow_ones():
    async def scenario():
        slow, bad = Stream(["late"], every_s=30.0), Stream(["x"], fail_after=0)
        with pytest.raises(ValueError, match="failed at x"):
            await asyncio.wait_for(first_of_each([slow.iterator, bad.iterator]), timeout=5)
        return slow, bad

    slow, bad = asyncio.run(scenario())
    assert slow.closed and bad.closed


def test_a_stream_with_no_items_is_an_error_not_a_missing_choice():
    async def scenario():
        empty, other = Stream([]), Stream(["a"])
        with pytest.raises(RuntimeError, match="without an output"):
            await first_of_each([empty.iterator, other.iterator])
        return other

    assert asyncio.run(scenario()).closed
