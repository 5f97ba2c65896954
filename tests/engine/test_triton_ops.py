"""The fused Triton kernels for RMSNorm (with the residual add), rotary embedding and SiLU-and-mul compute what the
layers' torch ops compute on the CPU, which is what HF's models compute.

Inputs are drawn on the CPU and the reference is the layers' own CPU path; the kernels run on CUDA where there is
one, else under Triton's interpreter (in a child process, as in test_triton_attention.py). Float32 agrees to
rounding (atol = rtol = 1e-5; the kernels sum squares in another order and use the hardware rsqrt). Bfloat16
rounds where the torch ops round, so at least 99.9% of its elements are bit-identical, and the rest (where a
float32 difference crosses a rounding boundary) one bfloat16 step away at most (atol = rtol = 8e-3). Bfloat16 runs
on the GPU only: the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest.
"""


import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from tests.engine.triton_checks import (
    CUDA,
    DEVICE,
    compile_for_hopper,
    kernels_do_not_run_here,
    modules_imported,
    run_under_the_interpreter,
    runs_kernels,
)
from workers.engine.layers import triton_ops
from workers.engine.layers.norm import RMSNorm
from workers.engine.layers.rotary import RotaryEmbedding

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=8e-3, rtol=8e-3)}
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


@kernels_do_not_run_here
def test_every_case_under_the_interpreter():
    run_under_the_interpreter(__file__)


def randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    out = out.cpu()
    torch.testing.assert_close(out, expected, **TOLERANCE[expected.dtype])
    if expected.dtype == torch.bfloat16:
        assert (out != expected).float().mean().item() <= 1e-3


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 4096])  # 96: masked tail of a 128-wide block
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_with_the_residual_add_matches_the_torch_layer(hidden, with_residual, dtype):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data = randn(hidden, dtype=dtype)
    x, residual = randn(7, hidden, dtype=dtype) * 3, randn(7, hidden, dtype=dtype) if with_residual else None
    expected, expected_residual = norm(x, residual)
    out, new_residual = triton_ops.rms_norm(x.to(DEVICE), None if residual is None else residual.to(DEVICE),
                                            norm.weight.to(DEVICE), norm.eps)
    assert_matches(out, expected)
    assert torch.equal(new_residual.cpu(), expected_residual)  # one rounded add, as torch's


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (6, 2, 80), (32, 8, 128)])
def test_rotary_rotates_q_and_k_in_place_as_the_torch_layer(heads, kv_heads, head_dim, dtype):
    """q and k are strided views into one fused qkv output, as the model passes them; v must stay untouched."""
    torch.manual_seed(head_dim)
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, rope_theta=10000.0)
    rotary = RotaryEmbedding(config, head_dim, 512, torch.device("cpu"))
    positions = torch.tensor([0, 1, 17, 300, 511])
    qkv = randn(5, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected_q, expected_k = rotary(positions, q.reshape(5, heads, head_dim), k.reshape(5, kv_heads, head_dim))
    qkv = qkv.to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    before_v = v.clone()
    out_q, out_k = triton_ops.rotary(positions.to(DEVICE), q.view(5, heads, head_dim), k.view(5, kv_heads, head_dim),
                                     rotary.cos.to(DEVICE), rotary.sin.to(DEVICE))
    assert_matches(out_q, expected_q)
    assert_matches(out_k, expected_k)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(v, before_v)


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [100, 14336])  # 100: one masked tile; 14336: 14 full tiles
def test_silu_and_mul_matches_torch(width, dtype):
    torch.manual_seed(width)
    x = randn(3, 2 * width, dtype=dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    assert_matches(triton_ops.silu_and_mul(x.to(DEVICE)), F.silu(gate) * up)


def test_the_cpu_layers_never_load_triton_ops():
    code = "import torch; from workers.engine.layers.norm import RMSNorm; RMSNorm(8, 1e-5)(torch.ones(2, 8))"
    assert modules_imported(code, ("workers.engine.layers.triton_ops",)) == []


@kernels_do_not_run_here
def test_kernels_compile_for_hopper_without_bfloat16_fmas():
    """What the interpreter only emulates, Triton still compiles without a GPU, for an H100 (sm_90), with the options
    each kernel is launched with. A bfloat16 FMA would skip the rounding of a product that the torch ops round."""
    types = {"eps": "fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "positions_ptr": "*i64"}
    kernels = [(triton_ops._rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096), {}),
               (triton_ops._rotary_kernel, dict(HALF=64, BLOCK_H=32, BLOCK_HALF=64), triton_ops.ROTARY_OPTIONS),
               (triton_ops._silu_and_mul_kernel, dict(BLOCK=triton_ops.SILU_BLOCK), {})]
    for kernel, constexprs, options in kernels:
        compiled = compile_for_hopper(kernel, constexprs, types, options)
        assert compiled.asm["cubin"] and "fma.rn.bf16" not in compiled.asm["ptx"], kernel
