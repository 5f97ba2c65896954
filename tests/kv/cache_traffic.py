"""Drives a BlockManager the way the scheduler does, for the tests of what it reports (KV events, the index)."""

import random

from workers.engine.block_manager import BlockManager
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

BS = 4  # small blocks: a few tokens make several of them


def serve(bm: BlockManager, tokens: list[int], rid: str = "r") -> Sequence:
    """Admit a prompt as the scheduler does (device hits, then blocks the host tier reloads), compute it whole,
    cache its full blocks and free it."""
    seq = Sequence(rid, list(tokens), SamplingParams(), BS)
    hits = bm.get_computed_blocks(seq)
    reloaded = bm.get_offloaded_blocks(seq, len(hits))
    assert bm.allocate_slots(seq, seq.num_tokens - (len(hits) + len(reloaded)) * BS, hits, reloaded)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    bm.free(seq)
    return seq


def churn(bm: BlockManager, num_prompts: int, seed: int = 0) -> None:
    """Prompts that share a few prefixes, on a cache small enough that they keep evicting each other."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(8)] for _ in range(3)]
    for i in range(num_prompts):
        serve(bm, rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 14))], f"r{seed}-{i}")
