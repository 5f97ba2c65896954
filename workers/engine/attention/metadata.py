"""What one forward pass needs to know to read and write the paged KV cache.

The runner lays a step's tokens out as: every sequence with more than one new token (prefill chunks) first,
then all single-token sequences (decodes), so the backend can run the decodes as one batched call.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PrefillMeta:
    """One sequence computing `query_len` new tokens at the end of a `context_len`-token context."""

    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks_of_this_sequence]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]: flat cache slot (block_id * block_size + offset) of each new token
    prefills: list[PrefillMeta]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor  # [num_decodes], ascending
    # Runs of decodes of similar context length, each padded only to its own longest: (start, end, max_len).
    decode_buckets: list[tuple[int, int, int]]
    # The step's kernels launch chained, each to the one before (layers/fusion.py SmallBatchFusion.chained).
    chained: bool = False

    @property
    def num_decodes(self) -> int:
        return self.decode_context_lens.shape[0]


MAX_DECODE_BUCKETS = 4


def decode_buckets(context_lens: list[int]) -> list[tuple[int, int, int]]:
    """Splits ascending context lengths into up to MAX_DECODE_BUCKETS runs of equal count.

    A backend that pads K/V to a common length wastes the gap between short and long contexts; a few buckets
    recover most of it for the cost of a few more calls.
    """
    n = len(context_lens)
    size = -(-n // MAX_DECODE_BUCKETS) if n else 0
    return [(start, min(start + size, n), context_lens[min(start + size, n) - 1]) for start in range(0, n, size or 1)]


def slot_of(block_table, position, block_size: int):
    """The KV cache slot of a position: its block's id times the block size, plus its offset in the block. Takes
    ints and a list, or numpy arrays for a chunk's positions at once."""
    return block_table[position // block_size] * block_size + position % block_size


def pad_block_tables(tables: list[list[int]], width: int, fill: int, rows: int | None = None) -> torch.Tensor:
    """The sequences' block tables as one [rows, width] CPU tensor, each row padded with `fill`, and rows past the
    tables all `fill`. Built in numpy from one flat copy of the ids: at 256 sequences of 64 blocks, nested Python
    lists took 1.9 ms of every decode step, this 0.3 ms."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    out = np.full((len(tables) if rows is None else rows, width), fill, dtype=np.int64)
    out[:len(tables)][np.arange(width) < lens[:, None]] = flat
    return torch.from_numpy(out)
