"""Triton kernels for paged attention: the rotary embedding with the KV write, decode over paged KV (split-K) and
prefill over paged KV.

Layouts are the engine's: q/out [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim] (any token and head
strides, head_dim contiguous), caches [num_blocks, block_size, kv_heads, head_dim] with head_dim contiguous. The
token at position p of a sequence lives in cache block block_table[p // block_size], row p % block_size. Kernels
look the block up per key token, so a key tile (BLOCK_N tokens) need not line up with cache blocks: any block
size works, and a table with holes costs nothing extra.

Softmax runs online in fp32 and in base 2 (the scale times log2(e) multiplies the fp32 scores). The running max
starts at a large finite negative instead of -inf, so a row whose keys in a tile are all masked out adds
exp2(-inf) = 0 where -inf would give exp2(-inf - -inf) = NaN. tl.dot runs with input_precision="ieee": float32
inputs (tests, float32 engines) stay exact rather than TF32, while bfloat16 and float16 ignore it and use tensor
cores.

Importing this module imports triton; only the triton backend does, so the CPU path never loads it.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from workers.engine.layers import triton_ops
from workers.engine.layers.triton_ops import rotary_angles, rotate_heads, rotated_halves, wait_for_the_kernel_before

LOG2E = 1.4426950408889634
BLOCK_N = 64  # key tokens per tile
BLOCK_M = 64  # query tokens per prefill program


@triton.jit
def _rotate_and_write_kv_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, positions_ptr,
                                slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_table, stride_cb, stride_cs, stride_ch, block_size, num_heads, num_kv_heads,
                                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr,
                                BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """Program per token: rotates its query heads in place, and writes its key heads, rotated, and its value heads
    to its cache slot. The rotation is the rotary kernel's (triton_ops.py), with its rounding; one launch does
    what the rotary kernel and a KV write did in two."""
    wait_for_the_kernel_before(PDL)
    t = tl.program_id(0)
    cos1, cos2, sin1, sin2 = rotary_angles(cos_ptr, sin_ptr, tl.load(positions_ptr + t), stride_table,
                                           q_ptr.dtype.element_ty, HALF, BLOCK_HALF)
    rotate_heads(q_ptr, stride_qt, stride_qh, t, num_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_H, BLOCK_HALF)
    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, BLOCK_KV)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_kv_heads) & (d < HALF)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h * stride_ch + d
    k = k_ptr + t * stride_kt + h * stride_kh + d
    k1, k2 = rotated_halves(tl.load(k, mask=mask, other=0.0), tl.load(k + HALF, mask=mask, other=0.0),
                            cos1, cos2, sin1, sin2)
    tl.store(k_cache_ptr + dst, k1, mask=mask)
    tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
    v = v_ptr + t * stride_vt + h * stride_vh + d
    tl.store(v_cache_ptr + dst, tl.load(v, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, tl.load(v + HALF, mask=mask), mask=mask)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, start, hi, q_pos, kv_head, qk_scale,
                 stride_cb, stride_cs, stride_ch, block_size, head_dim,
                 WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Folds the keys at positions [start, start + BLOCK_N) ∩ [0, hi) into the running (max, sum, output) of the
    rows of q, whose positions are q_pos: a key is visible from a row at or before it (and, with a sliding window,
    less than WINDOW behind it)."""
    pos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    in_range = pos < hi
    block = tl.load(table_ptr + pos // block_size, mask=in_range, other=0)
    kv_off = block * stride_cb + (pos % block_size) * stride_cs + kv_head * stride_ch
    kv_mask = in_range[:, None] & (d < head_dim)[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    visible = in_range[None, :] & (pos[None, :] <= q_pos[:, None])
    if WINDOW > 0:
        visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, context_lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                   arrivals_ptr, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb,
                   stride_cs, stride_ch, block_size, head_dim, group, num_heads, num_partitions,
                   SPLIT: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program (sequence, KV head, partition) attends the one new query of every query head in the KV head's
    group over the partition's keys.

    Decode is bound by reading K/V, so a program takes the whole group as the rows of one tile: each K/V byte is
    read once per KV head rather than once per query head (a GQA ratio of 4 reads a quarter as much), and the
    group's rows (padded to BLOCK_G >= 16) give tl.dot the tile height it needs. Without SPLIT there is a single
    partition and the program writes the normalised output; with SPLIT it writes its unnormalised output, max and
    sum, so a long context spreads over many programs even at batch 1, and the last of a (sequence, KV head)'s
    partitions to finish combines them, one query head at a time (unrolled over GROUP >= group heads, so their
    loads go out together). That last program is found by counting arrivals, as TensorRT-LLM's multi-block decode
    does, rather than by a second kernel: at batch 1 on an 8B model a step is a few hundred launches, and a
    reduce launch per layer was one in eleven of them.

    A partition's length follows its own sequence's context (whole key tiles, num_partitions of them cover it),
    not the batch's longest: a CUDA graph fixes the grid for the longest context it may meet, and every
    sequence still spreads over all its programs. Partitions past a short context attend nothing."""
    wait_for_the_kernel_before(PDL)
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    q_pos = tl.zeros([BLOCK_G], tl.int64) + context_len - 1
    partition_len = tl.cdiv(tl.cdiv(context_len, num_partitions), BLOCK_N) * BLOCK_N
    lo = part * partition_len
    hi = tl.minimum(lo + partition_len, context_len)
    if WINDOW > 0:
        lo = tl.maximum(lo, context_len - WINDOW)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    row_mask = (g < group)[:, None] & (d < head_dim)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_bt,
                                     start, hi, q_pos, kv_head, qk_scale, stride_cb, stride_cs, stride_ch,
                                     block_size, head_dim, WINDOW, BLOCK_N, BLOCK_D)
    if SPLIT:
        rows = (seq * num_heads + heads) * num_partitions + part
        tl.store(m_ptr + rows, m_i, mask=g < group)
        tl.store(l_ptr + rows, l_i, mask=g < group)
        tl.store(acc_ptr + rows[:, None] * head_dim + d[None, :], acc, mask=row_mask)
        # Every thread's stores come before the arrival is counted (the barrier), and the count is a gpu-scope
        # release, so whichever program counts the last arrival (an acquire) sees all the partitions' stores.
        tl.debug_barrier()
        arrivals = arrivals_ptr + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") == num_partitions - 1:
            tl.store(arrivals, 0)  # ready for the next launch, or the next replay of a CUDA graph
            for r in tl.static_range(GROUP):  # rows past the group redo its last head and store nothing
                head = kv_head * group + tl.minimum(r, group - 1)
                _combine_partitions(m_ptr, l_ptr, acc_ptr, out_ptr + seq * stride_ot + head * stride_oh,
                                    seq * num_heads + head, r < group, head_dim, num_partitions, BLOCK_P, BLOCK_D)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask)


@triton.jit
def _combine_partitions(m_ptr, l_ptr, acc_ptr, out_ptr, head_row, store, head_dim, num_partitions,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes one query head's output, combining its partitions' partial softmaxes (log-sum-exp): each
    partition's output and sum are rescaled by 2^(its max - the overall max). Empty partitions carry sum 0 and
    add nothing. All partitions load at once, in one round trip to L2, and skip L1 (.cg): they are other
    programs' stores."""
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    row = head_row * num_partitions + p
    m_i = tl.load(m_ptr + row, mask=p < num_partitions, other=-1.0e30, cache_modifier=".cg")
    l_i = tl.load(l_ptr + row, mask=p < num_partitions, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ptr + row[:, None] * head_dim + d[None, :],
                  mask=(p < num_partitions)[:, None] & (d < head_dim)[None, :], other=0.0, cache_modifier=".cg")
    w = tl.exp2(m_i - tl.max(m_i, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_i * w, 0)
    tl.store(out_ptr + d, out.to(out_ptr.dtype.element_ty), mask=d < tl.where(store, head_dim, 0))


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, out_ptr, qk_scale, query_start, query_len,
                    context_len, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                    block_size, head_dim, group,
                    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (query tile, query head) attends BLOCK_M of the chunk's queries over the cached prefix and the
    chunk itself (already written to the cache), causally. Keys past the tile's last query, or before its first
    query's window, are never loaded. Unlike decode, prefill is bound by compute, not by reading K/V, so one query
    head per program is enough: the programs of a GQA group read the same K/V tiles, mostly from L2."""
    tile, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    first = context_len - query_len + tile * BLOCK_M  # position of the tile's first query
    # Rows past the chunk's end take its last query's position, so that they too see a key (they are not stored).
    q_pos = context_len - query_len + tl.minimum(rows, query_len - 1)
    row_mask = (rows < query_len)[:, None] & (d < head_dim)[None, :]
    q_off = (query_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask, other=0.0)
    hi = tl.minimum(context_len, first + BLOCK_M)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(first - WINDOW + 1, 0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, start, hi, q_pos,
                                     kv_head, qk_scale, stride_cb, stride_cs, stride_ch, block_size, head_dim,
                                     WINDOW, BLOCK_N, BLOCK_D)
    out = acc / l_i[:, None]
    o_off = (query_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_mask)


# Whether the kernels run under Triton's CPU interpreter. That takes TRITON_INTERPRET=1 from before triton itself
# was imported (its library functions, tl.zeros and tl.sum among them, are built then), not only before this module.
INTERPRETED = all(isinstance(f, InterpretedFunction) for f in (_decode_kernel, tl.zeros))


def rotate_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, pdl: bool = False) -> None:
    """Rotates q in place by `positions` (cos/sin: the rotary tables, [max_positions, head_dim] float32), and
    writes k, rotated, and v into k_cache/v_cache.view(-1, kv_heads, head_dim)[slot_mapping]; k itself is left
    as it was. `pdl` launches it chained to the kernel before (triton_ops.wait_for_the_kernel_before)."""
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    _rotate_and_write_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, cos, sin, positions, slot_mapping, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), cos.stride(0), *k_cache.stride()[:3], k_cache.shape[1], num_heads,
        k.shape[1], HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KV=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half), PDL=pdl,
        launch_pdl=pdl, **triton_ops.ROTARY_OPTIONS)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, out: torch.Tensor, scale: float, window: int | None,
                     num_partitions: int, arrivals: torch.Tensor, pdl: bool = False) -> None:
    """out[i] = attention of q[i] (one token per sequence, at position context_lens[i] - 1) over its context.

    num_partitions > 1 splits each context into that many partitions attended by separate programs, the last to
    finish combining them; 1 attends each context in one program. `arrivals` holds zeroed int32 counters, at
    least one per (sequence, KV head), which split-K counts in and leaves zeroed. `pdl` launches it chained to the
    kernel before (triton_ops.wait_for_the_kernel_before)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    split = num_partitions > 1
    if split and arrivals.numel() < num_seqs * num_kv_heads:
        raise ValueError(f"{arrivals.numel()} arrival counters for {num_seqs} x {num_kv_heads} (sequence, KV head)")
    partials = [torch.empty((num_seqs, num_heads, num_partitions, *extra), dtype=torch.float32, device=q.device)
                for extra in ((), (), (head_dim,))] if split else [out] * 3
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, *partials, arrivals, scale * LOG2E, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), *k_cache.stride()[:3], k_cache.shape[1],
        head_dim, group, num_heads, num_partitions,
        SPLIT=split, WINDOW=window or 0, GROUP=triton.next_power_of_2(group),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        BLOCK_P=triton.next_power_of_2(num_partitions), BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl,
        launch_pdl=pdl)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      out: torch.Tensor, scale: float, window: int | None, query_start: int, query_len: int,
                      context_len: int) -> None:
    """out[query_start:query_start + query_len] = causal attention of those queries, the last query_len positions
    of a context_len-token sequence, over the whole context read from the cache."""
    num_heads, head_dim = q.shape[1:]
    _prefill_kernel[(triton.cdiv(query_len, BLOCK_M), num_heads)](
        q, k_cache, v_cache, block_table, out, scale * LOG2E, query_start, query_len, context_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], k_cache.shape[1], head_dim,
        num_heads // k_cache.shape[2],
        WINDOW=window or 0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(head_dim))
