"""What one forward pass needs to know to read and write the paged KV cache.

The runner lays a step's tokens out as: every sequence with more than one new token (prefill chunks) first,
then all single-token sequences (decodes), so the backend can run the decodes as one batched call.
"""

from dataclasses import dataclass

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
    decode_context_lens: torch.Tensor  # [num_decodes]
    max_decode_context_len: int

    @property
    def num_decodes(self) -> int:
        return self.decode_context_lens.shape[0]
