"""The fused small-batch projections compute what the layers compute with the op before them kept apart: residual
add + RMSNorm then qkv_proj / gate_up_proj, SiLU-and-mul then down_proj, and o_proj alone, with and without a
bias, for 1 to 16 token rows; launched chained, they compute the same bits; a CPU step never takes them.

Inputs are drawn on the CPU and the reference is the layers' own path on the kernels' device; the kernels run on
CUDA where there is one, else under Triton's interpreter (in a child process, as in test_triton_attention.py).
The prologue computes the same bits as the separate op; the matmul sums in its own order, so float32 agrees to
atol = rtol = 1e-4 (sums of up to 300 products here), and bfloat16 (on the GPU only, at Llama-3.1-8B's shapes)
to two bfloat16 steps (1.6e-2); the new residual is a rounded add and must be exact.
"""


import re

import pytest
import torch

from tests.engine.triton_checks import (
    DEVICE,
    compile_for_hopper,
    gpu,
    kernels_do_not_run_here,
    modules_imported,
    run_under_the_interpreter,
    runs_kernels,
    waits_for_the_kernel_before,
)
from workers.engine.layers import triton_projections
from workers.engine.layers.fusion import SmallBatchFusion, norm_then_linear, row_linear, silu_mul_then_linear
from workers.engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.engine.layers.norm import RMSNorm
from workers.engine.parallel import TensorParallel

TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@kernels_do_not_run_here
def test_every_case_under_the_interpreter():
    run_under_the_interpreter(__file__)


def layers(hidden: int, features: int, bias: bool, dtype: torch.dtype):
    """An RMSNorm, a column-parallel projection of `hidden` and a row-parallel one back to `hidden` from
    `features`, with random weights, on the kernels' device."""
    norm = RMSNorm(hidden, eps=1e-5)
    column = ColumnParallelLinear(hidden, [features], bias, TensorParallel())
    row = RowParallelLinear(features, hidden, bias, TensorParallel())
    for module in (norm, column, row):
        for param in module.parameters():
            param.data = torch.randn(param.shape) * (1 if param.dim() == 1 else param.shape[1] ** -0.5)
    return (module.to(DEVICE, dtype) for module in (norm, column, row))


def fused(chained: bool = False) -> SmallBatchFusion:
    """Fusion as the engine turns it on: for steps of up to one tile of rows."""
    return SmallBatchFusion(max_rows=triton_projections.BLOCK_M, chained=chained)


def randn(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).to(DEVICE)


def assert_fused_norm_projection_matches(rows: int, hidden: int, features: int, residual: bool, bias: bool,
                                         dtype: torch.dtype) -> None:
    torch.manual_seed(rows * hidden + features)
    norm, proj, _ = layers(hidden, features, bias, dtype)
    x, r = randn(rows, hidden, dtype=dtype) * 3, randn(rows, hidden, dtype=dtype) if residual else None
    h, expected_residual = norm(x, r)
    out, new_residual = triton_projections.norm_linear(x, r, norm.weight, norm.eps, proj.weight, proj.bias)
    torch.testing.assert_close(out, proj(h), **TOLERANCE[dtype])
    assert torch.equal(new_residual, expected_residual)


def assert_fused_silu_projection_matches(rows: int, hidden: int, features: int, bias: bool,
                                         dtype: torch.dtype) -> None:
    torch.manual_seed(rows * hidden + features)
    _, _, down = layers(hidden, features, bias, dtype)
    gate_up = randn(rows, 2 * features, dtype=dtype) * 4
    expected = silu_mul_then_linear(SmallBatchFusion(), down, gate_up)  # the separate ops
    torch.testing.assert_close(triton_projections.silu_mul_linear(gate_up, down.weight, down.bias), expected,
                               **TOLERANCE[dtype])


# hidden 96 / features 80: one masked tile each way; hidden 300: two K tiles, the second masked.
@runs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("hidden", [96, 300])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_norm_then_projection_in_one_kernel_matches_the_layers(rows, hidden, residual, bias):
    assert_fused_norm_projection_matches(rows, hidden, 80, residual, bias, torch.float32)


@runs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("features", [96, 300])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_silu_and_mul_then_projection_in_one_kernel_matches_the_layers(rows, features, bias):
    assert_fused_silu_projection_matches(rows, 80, features, bias, torch.float32)


@runs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("features", [96, 300])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_a_projection_without_a_prologue_matches_the_layer(rows, features, bias):
    torch.manual_seed(rows * features)
    _, _, o_proj = layers(80, features, bias, torch.float32)
    x = randn(rows, features, dtype=torch.float32)
    torch.testing.assert_close(triton_projections.linear(x, o_proj.weight, o_proj.bias), o_proj(x),
                               **TOLERANCE[torch.float32])


@runs_kernels
def test_more_rows_than_one_tile_are_refused():
    x = torch.zeros(triton_projections.BLOCK_M + 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16"):
        triton_projections.silu_mul_linear(x, torch.zeros(8, 16, device=DEVICE), None)


def test_a_cpu_step_keeps_the_separate_ops_and_never_loads_the_kernels():
    code = ("import torch; from workers.engine.layers.fusion import SmallBatchFusion, norm_then_linear, "
            "silu_mul_then_linear; from workers.engine.layers.linear import ColumnParallelLinear, RowParallelLinear; "
            "from workers.engine.layers.norm import RMSNorm; from workers.engine.parallel import TensorParallel; "
            "fusion = SmallBatchFusion(max_rows=16); x = torch.randn(2, 32); "
            "h, r = norm_then_linear(fusion, RMSNorm(32, 1e-5), ColumnParallelLinear(32, [48], True, "
            "TensorParallel()), x, x); "
            "silu_mul_then_linear(fusion, RowParallelLinear(24, 32, True, TensorParallel()), h)")
    assert modules_imported(code, ("workers.engine.layers.triton_projections", "triton")) == []


@kernels_do_not_run_here
@pytest.mark.parametrize("config", triton_projections.CONFIGS, ids=str)
def test_every_config_compiles_for_hopper_pipelined_within_shared_memory_and_without_bf16_fmas(config):
    """As a launch on aligned tensors specializes it: every tile of the weight and of the input rows, in the norm's
    first pass too, streams through shared memory a few tiles ahead (async copies; a plain load waits out its trip
    to memory before the next is asked for), within an H100's 227 KiB, and no bfloat16 FMA skips a rounding of
    the norm or SiLU-and-mul."""
    types = {"eps": "fp32", "M": "i32", "N": "i32", "K": "i32"}
    aligned = ("x_ptr", "residual_ptr", "norm_ptr", "weight_ptr", "bias_ptr", "out_ptr", "residual_out_ptr", "N",
               "K", "stride_x", "stride_r", "stride_w", "stride_o", "stride_ro")
    for prologue, residual in ((triton_projections.NORM, True), (triton_projections.NORM, False),
                               (triton_projections.SILU_MUL, False), (triton_projections.NONE, False)):
        constexprs = dict(PROLOGUE=prologue, HAS_RESIDUAL=residual, HAS_BIAS=True, PDL=False,
                          BLOCK_M=triton_projections.BLOCK_M, **config.kwargs)
        compiled = compile_for_hopper(triton_projections._projection_kernel, constexprs, types,
                                      dict(num_warps=config.num_warps, num_stages=config.num_stages), aligned)
        waited_tiles = re.findall(r"tt\.load .*: tensor<\d+x\d+x!tt\.ptr", compiled.asm["ttgir"])
        assert compiled.metadata.shared <= 227 * 1024 and not waited_tiles, (prologue, residual, waited_tiles)
        assert "fma.rn.bf16" not in compiled.asm["ptx"] and "griddepcontrol" not in compiled.asm["ptx"]


@kernels_do_not_run_here
def test_launched_chained_every_prologue_waits_for_the_kernel_before_it_first_touches_memory():
    types = {"eps": "fp32", "M": "i32", "N": "i32", "K": "i32"}
    config = triton_projections.CONFIGS[0]
    for prologue in (triton_projections.NORM, triton_projections.SILU_MUL, triton_projections.NONE):
        constexprs = dict(PROLOGUE=prologue, HAS_RESIDUAL=True, HAS_BIAS=True, PDL=True,
                          BLOCK_M=triton_projections.BLOCK_M, **config.kwargs)
        compiled = compile_for_hopper(triton_projections._projection_kernel, constexprs, types,
                                      dict(num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=True))
        assert compiled.metadata.launch_pdl and waits_for_the_kernel_before(compiled.asm["ptx"]), prologue


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_llama_8b_shapes_in_bfloat16(rows):
    """qkv_proj (4096 -> 6144), gate_up_proj (4096 -> 28672) and down_proj (14336 -> 4096)."""
    for features in (6144, 28672):
        assert_fused_norm_projection_matches(rows, 4096, features, True, False, torch.bfloat16)
    assert_fused_norm_projection_matches(rows, 4096, 6144, True, True, torch.bfloat16)  # Qwen2's qkv bias
    assert_fused_silu_projection_matches(rows, 4096, 14336, False, torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_the_layers_send_small_steps_to_the_fused_kernels_when_fusion_is_on(monkeypatch):
    launches = []
    project = triton_projections._project
    monkeypatch.setattr(triton_projections, "_project",
                        lambda *a, **kw: launches.append((a[3], a[5])) or project(*a, **kw))
    torch.manual_seed(0)
    norm, column, row = layers(96, 80, True, torch.float32)
    x, r = randn(3, 96, dtype=torch.float32), randn(3, 96, dtype=torch.float32)
    (h_fused, r_fused), (h, r_plain) = (norm_then_linear(f, norm, column, x, r) for f in (fused(), SmallBatchFusion()))
    torch.testing.assert_close(h_fused, h, **TOLERANCE[torch.float32])
    assert torch.equal(r_fused, r_plain)
    gate_up = torch.cat([h, h], dim=-1)
    torch.testing.assert_close(silu_mul_then_linear(fused(), row, gate_up),
                               silu_mul_then_linear(SmallBatchFusion(), row, gate_up), **TOLERANCE[torch.float32])
    big = randn(triton_projections.BLOCK_M + 1, 96, dtype=torch.float32)
    norm_then_linear(fused(), norm, column, big, big)  # more rows than fusion is on for
    row_linear(fused(), row, h)  # o_proj stays the layer's own unless the launches are chained
    assert launches == [(triton_projections.NORM, False), (triton_projections.SILU_MUL, False)]
    launches.clear()
    chained = [norm_then_linear(fused(True), norm, column, x, r)[0], silu_mul_then_linear(fused(True), row, gate_up),
               row_linear(fused(True), row, h)]
    assert launches == [(triton_projections.NORM, True), (triton_projections.SILU_MUL, True),
                        (triton_projections.NONE, True)]
    assert torch.equal(chained[0], h_fused)  # chaining changes when a kernel starts, not what it computes
    assert torch.equal(chained[1], silu_mul_then_linear(fused(), row, gate_up))
    torch.testing.assert_close(chained[2], row(h), **TOLERANCE[torch.float32])
