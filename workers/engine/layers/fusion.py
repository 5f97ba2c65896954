"""Where a decoder layer's projections take their elementwise op with them: steps of up to `max_rows` tokens on a
GPU run RMSNorm inside qkv_proj and gate_up_proj, and SiLU-and-mul inside down_proj (triton_projections.py);
other steps, and every CPU step, run the op and then the layer's own matmul.

With `chained` on as well, o_proj runs in the projection kernel too, so such a step's decoder layer is Triton
kernels alone (the projections, then the attention backend's rotary-and-KV-write and decode kernels), and each
launches chained to the one before (programmatic dependent launch, sm_90 and later): the GPU schedules it while
its predecessor's last programs finish, instead of after. At batch 1 a step is some 200 kernels whose work
takes microseconds, so the gaps between them count.

The engine turns these on only where it measured them faster (ModelRunner, when it captures its CUDA graphs):
cuBLAS's GEMV against a Triton kernel with one launch fewer is a question for each GPU.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from workers.engine.layers.norm import RMSNorm


@dataclass
class SmallBatchFusion:
    max_rows: int = 0  # 0: never
    chained: bool = False  # with max_rows: o_proj too, and every kernel of the layer launched chained

    def applies(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.shape[0] <= self.max_rows

    def chains(self, x: torch.Tensor) -> bool:
        return self.chained and self.applies(x)


def norm_then_linear(fusion: SmallBatchFusion, norm: RMSNorm, linear: ColumnParallelLinear | QKVParallelLinear,
                     x: torch.Tensor,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual), as RMSNorm returns its residual."""
    if fusion.applies(x):
        from workers.engine.layers import triton_projections

        return triton_projections.norm_linear(x, residual, norm.weight, norm.eps, linear.weight, linear.bias,
                                              fusion.chained)
    h, residual = norm(x, residual)
    return linear(h), residual


def silu_mul_then_linear(fusion: SmallBatchFusion, linear: RowParallelLinear, gate_up: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up) for gate_up = [gate | up]. A sharded down_proj keeps the separate ops: its
    all-reduce comes between the matmul and the bias."""
    if fusion.applies(gate_up) and linear.tp.size == 1:
        from workers.engine.layers import triton_projections

        return triton_projections.silu_mul_linear(gate_up, linear.weight, linear.bias, fusion.chained)
    if gate_up.is_cuda:  # one Triton kernel instead of two torch ops
        from workers.engine.layers import triton_ops

        return linear(triton_ops.silu_and_mul(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up)


def row_linear(fusion: SmallBatchFusion, linear: RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """linear(x), in the chain of Triton kernels where the step's launches are chained (o_proj)."""
    if fusion.chains(x) and linear.tp.size == 1:
        from workers.engine.layers import triton_projections

        return triton_projections.linear(x, linear.weight, linear.bias, pdl=True)
    return linear(x)
