"""Several requests' output streams answered as one: an OpenAI request with n > 1 or a batch of prompts is one
cluster request per choice, and its response interleaves their outputs as they come."""

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")


async def first_of_each(streams: list[AsyncIterator[T]]) -> list[T]:
    """Every stream's first item, awaited together so the requests run side by side. As soon as one stream
    fails (bad input, a full cluster) the others are cancelled, every stream is closed, and its error is raised."""
    reads = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        await asyncio.wait(reads, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((read.exception() for read in reads if read.done() and read.exception()), None)
        if isinstance(failed, StopAsyncIteration):
            raise RuntimeError("a request ended without an output")
        if failed is not None:
            raise failed
        return [read.result() for read in reads]
    except BaseException:
        await _abandon(reads, streams)
        raise


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) for every item of every stream, in the order they arrive. When one stream
    fails or the consumer stops early, the reads still pending are cancelled and every stream is closed."""
    reads = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in sorted(done, key=reads.__getitem__):
                i = reads.pop(read)
                try:
                    item = read.result()
                except StopAsyncIteration:
                    continue
                reads[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        await _abandon(reads, streams)


async def lasts(firsts: list[T], streams: list[AsyncIterator[T]]) -> list[T]:
    """Every stream's last item, its first given (read by first_of_each)."""
    last = list(firsts)
    async with aclosing(merged(streams)) as rest:
        async for i, item in rest:
            last[i] = item
    return last


async def close_all(streams: list[AsyncIterator[T]]) -> None:
    for stream in streams:
        await stream.aclose()


async def _abandon(reads: Iterable[asyncio.Future], streams: list[AsyncIterator[T]]) -> None:
    """Cancels the reads still pending (a stream cannot be closed while a read of it runs), then closes every
    stream."""
    for read in reads:
        read.cancel()
    await asyncio.gather(*reads, return_exceptions=True)
    await close_all(streams)
