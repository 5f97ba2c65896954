"""Triton kernels for the elementwise parts of a decoder layer: residual add + RMSNorm, rotary embedding of q and k,
and SiLU-and-mul, one launch each.

A decode step on the GPU is bound by how many kernels it launches as much as by the bytes it reads: written in
torch ops, RMSNorm takes about nine launches, rotary sixteen and SiLU-and-mul two, some 40 per layer in all, each
costing microseconds even replayed from a CUDA graph, which at batch 1 on an 8B model is as much time as reading
the weights. These kernels do the same arithmetic in one launch each.

They round where the torch ops round (every torch op on bfloat16 rounds its result to bfloat16, and HF's models
run those same ops), so the GPU path keeps HF's numerics: each intermediate a torch op would store in the model's
dtype is cast to it and back before the next step. In float32 those casts do nothing.

The layers call these on CUDA tensors only; the CPU path keeps the torch ops, and importing this module is what
imports triton.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_r, stride_o,
                     stride_ro, hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Program per token: (x + residual) is the new residual, in the model's dtype; its RMS is taken in float32,
    the normalised row cast to the model's dtype, then multiplied by the weight, as HF's LlamaRMSNorm does."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = (h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)).to(dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def rotary_angles(cos_ptr, sin_ptr, pos, stride_table, dtype: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """The cos and sin of position `pos`, each as its two halves [1, BLOCK_HALF] in float32. The float32 table rows
    are rounded to the model's dtype first, as the torch path casts them."""
    d = tl.arange(0, BLOCK_HALF)[None, :]
    row = pos * stride_table + d
    cos1 = tl.load(cos_ptr + row, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + HALF, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_ptr + row, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + HALF, mask=d < HALF, other=0.0).to(dtype).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def rotated_halves(x1, x2, cos1, cos2, sin1, sin2):
    """The two halves of x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), rounding each product and the
    sum to x's dtype as the torch ops do."""
    dtype = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (f1 * cos1).to(dtype).to(tl.float32) + (-f2 * sin1).to(dtype).to(tl.float32)
    out2 = (f2 * cos2).to(dtype).to(tl.float32) + (f1 * sin2).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def rotate_heads(x_ptr, stride_t, stride_h, t, num_heads, cos1, cos2, sin1, sin2,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates every head of token t in place. (rotary_angles, rotated_halves and rotate_heads are shared with the
    attention kernel that rotates and writes the KV cache in one launch.)"""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < HALF)
    ptr1 = x_ptr + t * stride_t + h * stride_h + d
    out1, out2 = rotated_halves(tl.load(ptr1, mask=mask, other=0.0), tl.load(ptr1 + HALF, mask=mask, other=0.0),
                                cos1, cos2, sin1, sin2)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr1 + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_table, num_heads, num_kv_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Program per token rotates its query and key heads by the angles of its position."""
    t = tl.program_id(0)
    cos1, cos2, sin1, sin2 = rotary_angles(cos_ptr, sin_ptr, tl.load(positions_ptr + t), stride_table,
                                           q_ptr.dtype.element_ty, HALF, BLOCK_HALF)
    rotate_heads(q_ptr, stride_qt, stride_qh, t, num_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_H, BLOCK_HALF)
    rotate_heads(k_ptr, stride_kt, stride_kh, t, num_kv_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_H, BLOCK_HALF)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, width, BLOCK: tl.constexpr):
    """Program per (token, column tile): silu(gate) * up for x = [gate | up], rounding silu's result first."""
    row, tile = tl.program_id(0), tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    dtype = up.dtype
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [T, hidden]; without a residual, x is the residual."""
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = x if residual is None else torch.empty_like(x)
    r = x if residual is None else residual
    _rms_norm_kernel[(num_tokens,)](x, r, weight, out, residual_out, x.stride(0), r.stride(0), out.stride(0),
                                    residual_out.stride(0), hidden, eps, HAS_RESIDUAL=residual is not None,
                                    BLOCK=triton.next_power_of_2(hidden))
    return out, residual_out


@triton.jit
def wait_for_the_kernel_before(PDL: tl.constexpr):
    """With PDL (a kernel launched with programmatic dependent launch, on sm_90 and later), a kernel may start
    while the one before it in the stream is still finishing: this waits, before the kernel touches memory, until
    that one has finished and its writes are visible (so, transitively, every kernel before it), then lets the
    next chained kernel be scheduled, to wait likewise. All its programs have started by then, so the next one
    only fills the SMs this one's last programs leave idle. Without PDL it does nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


# Compiler options of the rotary kernel. With floating-point fusion on (Triton's default), the compiler turns
# "round x * cos to bfloat16, add the rounded x' * sin" into one bfloat16 FMA that skips the first rounding, and on
# an H200 a quarter of the rotated values then differed from torch's by one bfloat16 step.
ROTARY_OPTIONS = dict(enable_fp_fusion=False)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, heads, d] and k [T, kv_heads, d] in place (views into the fused qkv output are fine: nothing
    else reads it) and returns them."""
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                  cos.stride(0), num_heads, k.shape[1], HALF=half,
                                  BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HALF=triton.next_power_of_2(half),
                                  **ROTARY_OPTIONS)
    return q, k


SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2 * width]."""
    num_tokens, width = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, width), dtype=x.dtype, device=x.device)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, SILU_BLOCK))](x, out, x.stride(0), out.stride(0), width,
                                                                      BLOCK=SILU_BLOCK)
    return out
