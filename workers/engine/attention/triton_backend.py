"""Paged attention in Triton kernels (triton_kernels.py): the GPU backend.

Same contract and results as TorchAttentionBackend, the reference its tests compare it with. On CPU tensors it
runs only under Triton's interpreter (TRITON_INTERPRET=1 before triton loads), which is how CI tests it.
"""

import torch
import triton

from workers.engine.attention import triton_kernels
from workers.engine.attention.metadata import AttentionMetadata
from workers.engine.layers.rotary import RotaryEmbedding

# Split-K for decode. A batch of fewer (sequence, KV head) programs than MIN_PROGRAMS leaves an H100's 132 SMs short
# of work over a long context, so each context is cut into partitions, each attended by a program of its own: as
# many as bring the batch to MIN_PROGRAMS, none shorter than MIN_PARTITION tokens, at most MAX_PARTITIONS.
# Untuned starting points: `tandem bench kernels` on a GPU is where to tune them.
MIN_PROGRAMS = 512
MIN_PARTITION = 128
MAX_PARTITIONS = 32


def num_partitions(num_programs: int, max_context_len: int) -> int:
    """Partitions per decode context (1: each context in one program)."""
    return max(1, min(MAX_PARTITIONS, triton.cdiv(MIN_PROGRAMS, num_programs), max_context_len // MIN_PARTITION))


class TritonAttentionBackend:
    def __init__(self, scale: float, sliding_window: int | None, rotary: RotaryEmbedding):
        self.scale = scale
        self.sliding_window = sliding_window
        self.rotary = rotary
        self._arrivals: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if q.device.type == "cpu" and not triton_kernels.INTERPRETED:
            raise ValueError("the triton attention backend runs on CPU tensors only under Triton's interpreter: "
                             "set TRITON_INTERPRET=1 before triton is imported, or use the torch backend")
        triton_kernels.rotate_and_write_kv(positions, q, k, v, self.rotary.cos, self.rotary.sin, k_cache, v_cache,
                                           meta.slot_mapping, meta.chained)
        out = torch.empty_like(q)
        for p in meta.prefills:
            triton_kernels.prefill_attention(q, k_cache, v_cache, p.block_table, out, self.scale, self.sliding_window,
                                             p.query_start, p.query_len, p.context_len)
        if meta.num_decodes:
            n = meta.num_prefill_tokens
            max_len = meta.decode_buckets[-1][2]  # decodes come sorted by context length
            triton_kernels.decode_attention(q[n:], k_cache, v_cache, meta.decode_block_tables,
                                            meta.decode_context_lens, out[n:], self.scale, self.sliding_window,
                                            num_partitions(meta.num_decodes * k_cache.shape[2], max_len),
                                            self._arrival_counters(meta.num_decodes * k_cache.shape[2], q.device),
                                            meta.chained)
        return out

    def _arrival_counters(self, num: int, device: torch.device) -> torch.Tensor:
        """The split-K decode's zeroed counters, at least `num`, shared by every layer and step: the kernel leaves
        them zeroed. A grown buffer keeps the one it replaces alive, since a captured CUDA graph counts in that."""
        if self._arrivals is None or self._arrivals.numel() < num or self._arrivals.device != device:
            if self._arrivals is not None:
                self._retired.append(self._arrivals)
            self._arrivals = torch.zeros(max(num, 1024), dtype=torch.int32, device=device)
        return self._arrivals
