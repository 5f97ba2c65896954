"""One request through a prefill group and a decode group: the whole disaggregated path, top to bottom.

    async for out in generate_disaggregated(prefill, decode, "Hello", SamplingParams(max_tokens=16)):
        ...

The prefill group computes the prompt's KV and first token and pins the blocks; the caller claims them for the
decode group (unclaimed, they go soon: a caller cancelled while its prefill call was on its way never gets the
handoff). The decode group takes the handoff, pulls the blocks it lacks from the prefill group (or recomputes the
prompt if that fails) and streams the rest. Both groups are anything with AsyncLLMEngine's interface: in-process
engines or Ray worker groups. A request that asks for prompt logprobs is prefilled by the decode group, which then
has them to stream.
"""

from collections.abc import AsyncIterator

from workers.engine.async_engine import AsyncLLMEngine, release_quietly
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams


async def generate_disaggregated(prefill: AsyncLLMEngine, decode: AsyncLLMEngine, prompt: str | list[int],
                                 params: SamplingParams | None = None, request_id: str | None = None,
                                 cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
    if params is not None and params.prompt_logprobs is not None:
        async for out in decode.generate(prompt, params, request_id, cache_salt):
            yield out
        return
    handoff = await prefill.prefill(prompt, params, request_id, cache_salt)
    prefill.claim(handoff.request_id)
    finished = False
    try:
        async for out in decode.generate_prefilled(handoff, params, prefill):
            finished = out.finished
            yield out
    finally:
        if not finished:
            # The caller left before the decode group took the KV: don't make the blocks wait out their lease.
            await release_quietly(prefill, handoff.request_id)
