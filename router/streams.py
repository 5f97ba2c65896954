"""Several requests' output streams answered as one: an OpenAI request with n > 1 or a batch of prompts is one
cluster request per choice, and its response interleaves their outputs as they come."""

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def first_of_each(streams: list[AsyncIterator[T]]) -> list[T]:
    """Every stream's first item, awaited together so the requests run side by side. If any stream fails (bad
    input, a full cluster) every stream is closed, which cancels the others, and its error is raised."""
    firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        await close_all(streams)
        if isinstance(failed, StopAsyncIteration):
            raise RuntimeError("a request ended without an output")
        raise failed
    return firsts


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
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        await close_all(streams)


async def close_all(streams: list[AsyncIterator[T]]) -> None:
    for stream in streams:
        await stream.aclose()
