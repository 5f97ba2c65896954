"""The Triton attention backend gives the torch reference backend's results: the rotary embedding with the KV
write, paged decode with and without split-K, chunked prefill over a cached prefix, sliding windows, a mixed batch
through the seam, and whole engine runs that greedily match HF transformers.

With CUDA the kernels run compiled, and the `gpu` test adds the full grid (contexts up to 8k, batch 33, GQA up to
8, bfloat16). Without CUDA they run under Triton's CPU interpreter on small shapes, in float32 only: Triton 3.9's
interpreter computes tl.dot on bfloat16 wrongly.

Tolerances against the torch backend, elementwise |a - b| <= atol + rtol * |b|: float32 atol = rtol = 1e-4 (the
interpreter agrees to ~1e-6; a 1% error in the scale moves outputs by ~1e-3), bfloat16 atol = rtol = 2e-2 (a few
bfloat16 ulps of outputs of magnitude ~1). The cache writes must be exact: V is a copy, and K is rotated with the
rounding of the torch ops.
"""

import functools
import random
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig

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
from tests.hf_reference import hf_greedy
from workers.engine.attention import triton_backend, triton_kernels
from workers.engine.attention.metadata import AttentionMetadata, PrefillMeta, decode_buckets
from workers.engine.attention.torch_backend import TorchAttentionBackend
from workers.engine.attention.triton_backend import TritonAttentionBackend
from workers.engine.layers import triton_ops
from workers.engine.layers.rotary import RotaryEmbedding
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

BLOCK_SIZE = 16
NUM_KV_HEADS = 2
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@kernels_do_not_run_here
def test_every_case_under_the_interpreter():
    run_under_the_interpreter(__file__)


@kernels_do_not_run_here
def test_kernels_compile_for_hopper_in_bfloat16():
    """What the interpreter only emulates, Triton still compiles without a GPU (to a cubin, with the ptxas it
    ships): tl.dot's minimum tile sizes, loop and pointer types, and shared memory within an H100's 227 KiB."""
    kernels = [(triton_kernels._rotate_and_write_kv_kernel, dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, BLOCK_HALF=64,
                                                                 PDL=False), triton_ops.ROTARY_OPTIONS),
               (triton_kernels._decode_kernel, dict(SPLIT=True, WINDOW=4096, GROUP=4, BLOCK_G=16, BLOCK_N=64,
                                                    BLOCK_P=32, BLOCK_D=128, PDL=False), {}),
               (triton_kernels._prefill_kernel, dict(WINDOW=4096, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128), {})]
    for kernel, constexprs, options in kernels:
        compiled = compile_for_hopper(kernel, constexprs, KERNEL_TYPES, options)
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024, kernel
    # The rotation rounds where the torch ops round (see test_triton_ops.py): no bfloat16 FMA may skip a rounding.
    assert "fma.rn.bf16" not in compile_for_hopper(*kernels[0][:2], KERNEL_TYPES, kernels[0][2]).asm["ptx"]


KERNEL_TYPES = {"qk_scale": "fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "arrivals_ptr": "*i32",
                "cos_ptr": "*fp32", "sin_ptr": "*fp32", "positions_ptr": "*i64", "slot_ptr": "*i64",
                "tables_ptr": "*i64", "table_ptr": "*i64", "context_lens_ptr": "*i64"}


@kernels_do_not_run_here
def test_split_k_partials_are_published_before_their_arrival_is_counted():
    """What the interpreter, running one program at a time, cannot show: the program that counts a group's last
    arrival reads partials other programs stored. So every thread of a program reaches a barrier after its
    stores, the count is one gpu-scope acquire-release atomic, and the combine's loads bypass L1."""
    constexprs = dict(SPLIT=True, WINDOW=0, GROUP=4, BLOCK_G=16, BLOCK_N=64, BLOCK_P=32, BLOCK_D=128, PDL=False)
    ptx = compile_for_hopper(triton_kernels._decode_kernel, constexprs, KERNEL_TYPES).asm["ptx"]
    atomics = [line.strip() for line in ptx.splitlines() if "atom." in line]
    assert len(atomics) == 1 and "atom.global.gpu.acq_rel.add" in atomics[0].replace(".u32", "").replace(".s32", ""), \
        atomics
    assert "bar.sync" in ptx[:ptx.index("atom.")]
    assert "ld.global.cg" in ptx[ptx.index("atom."):]


@kernels_do_not_run_here
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-k"])
def test_launched_chained_the_decode_kernels_wait_for_the_kernel_before_they_first_touch_memory(split):
    """A decode step's rotary-and-KV-write and decode attention may launch chained (layers/fusion.py): each may
    then start while the kernel before it finishes, so nothing it reads or writes may come before its wait."""
    kernels = [(triton_kernels._rotate_and_write_kv_kernel, dict(HALF=64, BLOCK_H=32, BLOCK_KV=8, BLOCK_HALF=64),
                triton_ops.ROTARY_OPTIONS),
               (triton_kernels._decode_kernel, dict(SPLIT=split, WINDOW=0, GROUP=4, BLOCK_G=16, BLOCK_N=64,
                                                    BLOCK_P=32, BLOCK_D=128), {})]
    for kernel, constexprs, options in kernels:
        compiled = compile_for_hopper(kernel, dict(constexprs, PDL=True), KERNEL_TYPES,
                                      dict(options, launch_pdl=True))
        assert compiled.metadata.launch_pdl and waits_for_the_kernel_before(compiled.asm["ptx"]), kernel


def test_the_torch_backend_never_loads_the_triton_modules():
    code = ("from workers.engine.attention.backend import get_attention_backend; "
            "get_attention_backend('torch', 0.125, None, None)")
    assert modules_imported(code, ("triton", "workers.engine.attention.triton")) == []


def block_tables(context_lens: list[int], rng: random.Random) -> tuple[list[list[int]], int]:
    """Each sequence's blocks, drawn from a shuffled pool with an unused block after every sequence: a kernel that
    reads blocks in order, or past a table's end, reads another sequence's K/V or garbage. Returns the tables and
    the number of blocks in the pool."""
    needed = [-(-n // BLOCK_SIZE) for n in context_lens]
    ids = list(range(2 * sum(needed) + len(needed)))
    rng.shuffle(ids)
    tables, used = [], 0
    for n in needed:
        tables.append(ids[used:used + n])
        used += n + 1
    return tables, len(ids)


def metadata(chunks: list[tuple[int, int]], tables: list[list[int]]) -> AttentionMetadata:
    """The runner's layout for sequences computing (query_len, context_len): multi-token chunks first, then the
    decodes, ascending by context length (the caller orders `chunks` so)."""
    slots, prefills, start = [], [], 0
    for (n, context_len), table in zip(chunks, tables):
        blocks = torch.tensor(table, device=DEVICE)
        pos = torch.arange(context_len - n, context_len, device=DEVICE)
        slots.append(blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        if n > 1:
            prefills.append(PrefillMeta(start, n, context_len, blocks))
        start += n
    decodes = [(context_len, table) for (n, context_len), table in zip(chunks, tables) if n == 1]
    width = max((len(table) for _, table in decodes), default=0)
    padded = [table + [0] * (width - len(table)) for _, table in decodes]
    lens = [context_len for context_len, _ in decodes]
    return AttentionMetadata(
        slot_mapping=torch.cat(slots), prefills=prefills, num_prefill_tokens=sum(p.query_len for p in prefills),
        decode_block_tables=torch.tensor(padded, dtype=torch.long, device=DEVICE).view(len(decodes), width),
        decode_context_lens=torch.tensor(lens, dtype=torch.long, device=DEVICE), decode_buckets=decode_buckets(lens))


@dataclass
class Step:
    """One step's attention inputs as the model passes them: q, k and v are views into one fused qkv projection,
    not yet rotated. The caches are random everywhere, so holes, padding and rows past a context's end hold garbage
    that shows up in the output if a kernel reads them."""

    positions: torch.Tensor
    qkv: torch.Tensor  # [tokens, (heads + 2 * NUM_KV_HEADS) * head_dim]
    num_heads: int
    head_dim: int
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v over a fresh copy of qkv: a backend rotates q (and may rotate k) in place."""
        sizes = [self.num_heads * self.head_dim] + [NUM_KV_HEADS * self.head_dim] * 2
        q, k, v = self.qkv.clone().split(sizes, dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, NUM_KV_HEADS, self.head_dim),
                v.view(-1, NUM_KV_HEADS, self.head_dim))

    @property
    def rotary(self) -> RotaryEmbedding:
        return rotary_embedding(self.head_dim)


@functools.cache
def rotary_embedding(head_dim: int) -> RotaryEmbedding:
    """Llama 3's rope base, over the longest context the tests use."""
    config = LlamaConfig(hidden_size=NUM_KV_HEADS * head_dim, num_attention_heads=NUM_KV_HEADS,
                         num_key_value_heads=NUM_KV_HEADS, head_dim=head_dim, rope_theta=500000.0)
    return RotaryEmbedding(config, head_dim, 8192, DEVICE)


def make_batch(chunks: list[tuple[int, int]], gqa: int, head_dim: int, dtype=torch.float32, seed: int = 0) -> Step:
    torch.manual_seed(seed)
    tables, num_blocks = block_tables([context_len for _, context_len in chunks], random.Random(seed))
    num_heads = NUM_KV_HEADS * gqa

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    positions = torch.cat([torch.arange(context_len - n, context_len, device=DEVICE) for n, context_len in chunks])
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, head_dim)
    return Step(positions, randn(len(positions), (num_heads + 2 * NUM_KV_HEADS) * head_dim), num_heads, head_dim,
                randn(*cache_shape), randn(*cache_shape), metadata(chunks, tables))


def assert_backends_agree(step: Step, window: int | None = None) -> None:
    scale = step.head_dim ** -0.5
    expected_k, expected_v = step.k_cache.clone(), step.v_cache.clone()
    expected = TorchAttentionBackend(scale, window, step.rotary).forward(step.positions, *step.inputs(), expected_k,
                                                                         expected_v, step.meta)
    out = TritonAttentionBackend(scale, window, step.rotary).forward(step.positions, *step.inputs(), step.k_cache,
                                                                     step.v_cache, step.meta)
    assert torch.equal(step.k_cache, expected_k) and torch.equal(step.v_cache, expected_v)
    torch.testing.assert_close(out, expected, **TOLERANCE[out.dtype])


def assert_decode_agrees(step: Step, window: int | None, num_partitions: int) -> None:
    """The kernels called directly, to choose split-K or not."""
    scale = step.head_dim ** -0.5
    meta, rotary = step.meta, step.rotary
    expected = TorchAttentionBackend(scale, window, rotary).forward(step.positions, *step.inputs(),
                                                                    step.k_cache.clone(), step.v_cache.clone(), meta)
    q, k, v = step.inputs()
    triton_kernels.rotate_and_write_kv(step.positions, q, k, v, rotary.cos, rotary.sin, step.k_cache, step.v_cache,
                                       meta.slot_mapping)
    out = torch.empty_like(q)
    arrivals = torch.zeros(meta.num_decodes * NUM_KV_HEADS, dtype=torch.int32, device=DEVICE)
    triton_kernels.decode_attention(q, step.k_cache, step.v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                    out, scale, window, num_partitions, arrivals)
    torch.testing.assert_close(out, expected, **TOLERANCE[out.dtype])
    assert not arrivals.any(), "split-K left its arrival counters for the next call (or graph replay) nonzero"


def decodes(context_lens: list[int]) -> list[tuple[int, int]]:
    return [(1, n) for n in sorted(context_lens)]


@runs_kernels
def test_rotate_and_write_kv_rotates_q_in_place_and_puts_rotated_k_and_v_in_their_slots():
    step = make_batch([(30, 70), (17, 17), (1, 5)], gqa=2, head_dim=64)
    q, k, v = step.inputs()
    expected_q, expected_k = step.rotary(step.positions, q.clone(), k.clone())
    expected_k_cache, expected_v_cache = step.k_cache.clone(), step.v_cache.clone()
    expected_k_cache.view(-1, NUM_KV_HEADS, 64).index_copy_(0, step.meta.slot_mapping, expected_k)
    expected_v_cache.view(-1, NUM_KV_HEADS, 64).index_copy_(0, step.meta.slot_mapping, v)
    triton_kernels.rotate_and_write_kv(step.positions, q, k, v, step.rotary.cos, step.rotary.sin, step.k_cache,
                                       step.v_cache, step.meta.slot_mapping)
    assert torch.equal(q, expected_q)
    assert torch.equal(step.k_cache, expected_k_cache) and torch.equal(step.v_cache, expected_v_cache)


# Contexts of 1, 17 (one past a block) and 100 (several blocks, two key tiles). Four partitions of whole 64-token
# key tiles split 100 in two (64 + 36) and leave its last two empty, as every partition after the first of the
# shorter contexts.
@runs_kernels
@pytest.mark.parametrize("num_partitions", [1, 4], ids=["one-pass", "split-k"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 2, 3, 4])  # 3: a group that is no power of two
@pytest.mark.parametrize("context_lens", [[100], [1, 17, 100]], ids=["batch1", "batch3"])
def test_decode_matches_torch(context_lens, gqa, head_dim, num_partitions):
    assert_decode_agrees(make_batch(decodes(context_lens), gqa, head_dim), None, num_partitions)


@runs_kernels
@pytest.mark.parametrize("num_partitions", [1, 4], ids=["one-pass", "split-k"])
def test_decode_sliding_window_matches_torch(num_partitions):
    assert_decode_agrees(make_batch(decodes([1, 17, 100]), 2, 64), 20, num_partitions)


# A chunk after a 40-token cached prefix, a fresh 17-token prompt and two decodes, in one step, as the runner
# lays them out.
@runs_kernels
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_mixed_chunked_prefill_and_decode_batch_matches_torch(gqa, head_dim, window):
    assert_backends_agree(make_batch([(30, 70), (17, 17), (1, 5), (1, 100)], gqa, head_dim), window)


def test_split_k_only_where_a_gpu_would_idle():
    assert triton_backend.num_partitions(num_programs=8, max_context_len=4096) == 32  # at most 32
    assert triton_backend.num_partitions(num_programs=128, max_context_len=64_000) == 4  # 512 programs in all
    assert triton_backend.num_partitions(num_programs=8, max_context_len=256) == 2  # none under 128 tokens
    assert triton_backend.num_partitions(num_programs=8, max_context_len=100) == 1
    assert triton_backend.num_partitions(num_programs=256 * 8, max_context_len=4096) == 1  # enough programs


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_full_grid_on_gpu(gqa, head_dim):
    """In bfloat16, the dtype the GPU serves in; float32 runs the same kernels on CPU (the interpreter), and
    test_cuda_graphs.py runs them compiled in float32 through whole engine steps."""
    dtype = torch.bfloat16
    lens = [1, 17, 100, 1000, 1023, 4097, 8192]
    for seed, batch in enumerate([[8192], lens, [random.Random(b).randint(1, 8192) for b in range(33)]]):
        for num_partitions in (1, 16, triton_backend.num_partitions(len(batch) * NUM_KV_HEADS, max(batch))):
            assert_decode_agrees(make_batch(decodes(batch), gqa, head_dim, dtype, seed), None, num_partitions)
        assert_decode_agrees(make_batch(decodes(batch), gqa, head_dim, dtype, seed), 4096, 16)
    for chunks in ([(8192, 8192)], [(192, 8192), (1000, 1000), (1, 300), (1, 8000)]):
        for window in (None, 4096):
            assert_backends_agree(make_batch(chunks, gqa, head_dim, dtype), window)


# Whole engine runs: a 20-token prompt beside a 70-token one prefilled in 32-token chunks (a cached prefix for
# every chunk after the first) that crosses mistral's 64-token sliding window, then decodes in one batch.
@runs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "granite"])
def test_engine_with_triton_backend_matches_hf(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    llm = LLM(str(path), device=DEVICE.type, dtype="float32", attention_backend="triton", num_kv_blocks=32,
              max_num_batched_tokens=32, progress=False)
    assert isinstance(llm.engine.runner.model.model.layers[0].self_attn.backend, TritonAttentionBackend)
    rng = random.Random(7)
    prompts = [[rng.randrange(49152) for _ in range(n)] for n in (20, 70)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 6)
