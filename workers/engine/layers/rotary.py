"""Rotary position embedding, with the frequencies computed by transformers' own rope functions.

Reusing ROPE_INIT_FUNCTIONS means every rope variant HF supports for a static table (default, linear, llama3,
yarn, longrope) gives exactly HF's inverse frequencies; the cos/sin table is computed once for the whole context.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    rope = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK rope scaling changes with sequence length and is not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](config)


class RotaryEmbedding(nn.Module):
    """Holds the float32 cos/sin tables on the device the model runs on. The attention backend applies it (the
    GPU backend in the launch that writes the KV cache, reading the tables itself), so it is no module of the
    model's: the model is built on the meta device and materialized in the model's dtype."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, device: torch.device):
        super().__init__()
        inv_freq, scaling = _inv_freq(config, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(device)
        self.sin = (emb.sin() * scaling).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T]. On CUDA one Triton kernel rotates
        both, in place (triton_ops.py)."""
        if q.is_cuda:
            from workers.engine.layers import triton_ops

            return triton_ops.rotary(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
