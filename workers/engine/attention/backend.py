"""The attention seam: a backend writes this step's K/V into the paged cache and attends over it.

Backends are chosen by name at start so GPU kernels (and their heavy imports) load only where they run.
"""

from typing import Protocol

import torch

from workers.engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d], k/v: [T, kv_heads, d], caches: [num_blocks, block_size, kv_heads, d] -> [T, heads, d]."""


def get_attention_backend(name: str, scale: float, sliding_window: int | None) -> AttentionBackend:
    if name == "torch":
        from workers.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(scale, sliding_window)
    if name == "triton":
        from workers.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(scale, sliding_window)
    raise ValueError(f"unknown attention backend {name!r} (available: torch, triton)")
