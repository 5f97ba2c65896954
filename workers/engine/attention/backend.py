"""The attention seam: a backend rotates this step's queries and keys by their positions (rotary embedding),
writes its K/V into the paged cache and attends over it.

The rotation is the backend's so a GPU backend can do it in the launch that writes the cache. Backends are chosen
by name at start so GPU kernels (and their heavy imports) load only where they run.
"""

from typing import Protocol

import torch

from workers.engine.attention.metadata import AttentionMetadata
from workers.engine.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """positions: [T], q: [T, heads, d], k/v: [T, kv_heads, d] (q and k not yet rotated; a backend may
        rotate them in place), caches: [num_blocks, block_size, kv_heads, d] -> [T, heads, d]."""


def get_attention_backend(name: str, scale: float, sliding_window: int | None,
                          rotary: RotaryEmbedding) -> AttentionBackend:
    if name == "torch":
        from workers.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(scale, sliding_window, rotary)
    if name == "triton":
        from workers.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(scale, sliding_window, rotary)
    raise ValueError(f"unknown attention backend {name!r} (available: torch, triton)")
