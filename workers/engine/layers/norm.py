"""RMSNorm, with the residual add fused into the same call (one pass over the hidden state instead of two)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); the statistics are taken in float32, as HF does, for parity in bf16.
        On CUDA one Triton kernel does it all (triton_ops.py)."""
        if x.is_cuda:
            from workers.engine.layers import triton_ops

            return triton_ops.rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), residual
