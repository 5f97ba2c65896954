"""Projections of a few tokens with the elementwise op before them done inside the same kernel: residual add +
RMSNorm before qkv_proj and gate_up_proj, SiLU-and-mul before down_proj; and o_proj as it is, so that a layer can
run as Triton kernels alone, chained (layers/fusion.py).

At batch 1 a decode step is a chain of a few hundred small kernels, and each costs its launch and the time its
first and last tiles leave the GPU idle on top of its work. A projection of at most BLOCK_M tokens reads its
weight once whatever it computes on the way, so its prologue is nearly free: every program recomputes the
normalised (or activated) input rows from the raw ones, which are a few KiB from L2, instead of reading them from
a tensor another launch wrote. That takes three launches out of each decoder layer. Whether this beats the
separate ops plus cuBLAS's GEMV depends on the GPU; fusion.py lets the engine measure each way and keep the
fastest.

The prologues round where the torch ops (and triton_ops.py's kernels) round, so the inputs to the matmul are the
same bits; the matmul itself accumulates in float32 in its own order, as any GEMM does.

Importing this module imports triton; only fusion.py does, on CUDA.
"""

import torch
import triton
import triton.language as tl

from workers.engine.layers.triton_ops import wait_for_the_kernel_before

BLOCK_M = 16  # token rows per program: tl.dot's smallest tile; steps of more tokens take the unfused path
NONE, NORM, SILU_MUL = 0, 1, 2  # the prologue (the kernels compare PROLOGUE with these numbers)

# Few configurations, since each costs a compile (about a second) when the engine starts; all stream a
# [BLOCK_N, BLOCK_K] weight tile per step, K-contiguous, a few steps ahead.
CONFIGS = [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=4, num_stages=s)
           for n, k, s in ((16, 256, 4), (32, 256, 4), (16, 512, 3), (64, 128, 4))]


@triton.jit
def _input_tile(x_ptr, residual_ptr, norm_ptr, residual_out_ptr, rows, ks, row_mask, k_mask, rstd, stride_x,
                stride_r, stride_ro, K, write_residual, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Columns `ks` of the matmul's input rows, in the model's dtype, computed from the raw input."""
    mask = row_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    if PROLOGUE == 1:  # NORM: the normalised row times the weight, as _rms_norm_kernel rounds it
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + rows[:, None] * stride_r + ks[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            if write_residual:
                tl.store(residual_out_ptr + rows[:, None] * stride_ro + ks[None, :], x, mask=mask)
        h = (x.to(tl.float32) * rstd[:, None]).to(dtype)
        w = tl.load(norm_ptr + ks, mask=k_mask, other=0.0)
        x = (w.to(tl.float32)[None, :] * h.to(tl.float32)).to(dtype)
    elif PROLOGUE == 2:  # SILU_MUL: x holds [gate | up], K columns each
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + rows[:, None] * stride_x + K + ks[None, :], mask=mask, other=0.0)
        x = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _projection_kernel(x_ptr, residual_ptr, norm_ptr, weight_ptr, bias_ptr, out_ptr, residual_out_ptr, M, N, K,
                       stride_x, stride_r, stride_w, stride_o, stride_ro, eps,
                       PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program per BLOCK_N output features: out[:M, cols] = prologue(x)[:M] @ weight[cols].T (+ bias), over
    K-long rows. With NORM, a first pass over the rows takes their RMS; program 0 alone stores the new residual
    (x + residual), which every program computes."""
    wait_for_the_kernel_before(PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == 1:
        squares = tl.zeros([BLOCK_M], tl.float32)
        # Stages named here, since Triton pipelines on its own only the loads that feed a tl.dot: without them,
        # each of this pass's K / BLOCK_K tiles waited out its own trip to L2 before the next was asked for.
        for k0 in tl.range(0, K, BLOCK_K, num_stages=4):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (ks < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(residual_ptr + rows[:, None] * stride_r + ks[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            h = x.to(tl.float32)
            squares += tl.sum(h * h, 1)
        rstd = tl.rsqrt(squares / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = _input_tile(x_ptr, residual_ptr, norm_ptr, residual_out_ptr, rows, ks, row_mask, k_mask, rstd,
                        stride_x, stride_r, stride_ro, K, pid == 0, PROLOGUE, HAS_RESIDUAL)
        w = tl.load(weight_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


_tuned = triton.autotune(CONFIGS, key=["N", "K", "PROLOGUE", "HAS_RESIDUAL", "HAS_BIAS"])(_projection_kernel)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: int, k: int, pdl: bool,
             residual: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
             residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the kernel: tuned on a GPU (the first call per shape times CONFIGS), with the first config under
    Triton's interpreter, which cannot time one. `pdl` launches it chained to the kernel before
    (triton_ops.wait_for_the_kernel_before)."""
    num_rows, n = x.shape[0], weight.shape[0]
    if num_rows > BLOCK_M:
        raise ValueError(f"{num_rows} rows: the fused projections take at most {BLOCK_M}")
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    r = residual if residual is not None else x
    ro = residual_out if residual_out is not None else x
    args = (x, r, norm if norm is not None else weight, weight, bias if bias is not None else weight, out, ro,
            num_rows, n, k, x.stride(0), r.stride(0), weight.stride(0), out.stride(0), ro.stride(0), eps)
    flags = dict(PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, PDL=pdl,
                 BLOCK_M=BLOCK_M, launch_pdl=pdl)
    if x.is_cuda:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    else:
        config = CONFIGS[0]
        _projection_kernel[(triton.cdiv(n, config.kwargs["BLOCK_N"]),)](*args, **flags, **config.kwargs)
    return out


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None,
                pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(RMSNorm(x + residual), weight, bias), x + residual); without a residual, x is the residual."""
    residual_out = None if residual is None else torch.empty_like(x)
    out = _project(x, weight, bias, NORM, x.shape[1], pdl, residual, norm_weight, eps, residual_out)
    return out, x if residual is None else residual_out


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    pdl: bool = False) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight, bias) for gate_up = [gate | up]."""
    return _project(gate_up, weight, bias, SILU_MUL, gate_up.shape[1] // 2, pdl)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pdl: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias)."""
    return _project(x, weight, bias, NONE, x.shape[1], pdl)
