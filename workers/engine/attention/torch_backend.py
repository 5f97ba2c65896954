"""Paged attention in plain torch: gathers each sequence's blocks and calls scaled_dot_product_attention.

Runs on CPU and GPU alike; it is the reference every faster backend is checked against.
"""

import torch
import torch.nn.functional as F

from workers.engine.attention.metadata import AttentionMetadata, PrefillMeta
from workers.engine.layers.rotary import RotaryEmbedding


class TorchAttentionBackend:
    def __init__(self, scale: float, sliding_window: int | None, rotary: RotaryEmbedding):
        self.scale = scale
        self.sliding_window = sliding_window
        self.rotary = rotary
        # Gathered K/V land in buffers reused across layers and steps: a fresh multi-MB tensor per call costs
        # more in page faults than the copy itself.
        self._workspace: dict[str, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k = self.rotary(positions, q, k)
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for p in meta.prefills:
            out[p.query_start:p.query_start + p.query_len] = self._prefill(q, k, v, k_cache, v_cache, p)
        if meta.num_decodes:
            out[meta.num_prefill_tokens:] = self._decode(q[meta.num_prefill_tokens:], k_cache, v_cache, meta)
        return out

    def _prefill(self, q, k, v, k_cache, v_cache, p: PrefillMeta) -> torch.Tensor:
        end = p.query_start + p.query_len
        query = q[p.query_start:end].transpose(0, 1)
        if p.context_len == p.query_len:
            # Nothing cached before this chunk: attend over the fresh K/V, no gather needed.
            keys, values = k[p.query_start:end], v[p.query_start:end]
        else:
            keys = self._gather("k", k_cache, p.block_table).flatten(0, 1)[:p.context_len]
            values = self._gather("v", v_cache, p.block_table).flatten(0, 1)[:p.context_len]
        kwargs = {}
        if p.context_len == p.query_len and self.sliding_window is None:
            kwargs["is_causal"] = True  # lets sdpa pick its fused causal kernel instead of a materialized mask
        else:
            q_pos = torch.arange(p.context_len - p.query_len, p.context_len, device=q.device)[:, None]
            kwargs["attn_mask"] = self._mask(q_pos, torch.arange(p.context_len, device=q.device)[None, :])
        o = F.scaled_dot_product_attention(query, keys.transpose(0, 1), values.transpose(0, 1), scale=self.scale,
                                           enable_gqa=True, **kwargs)
        return o.transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """One call per bucket of similar-length decodes. The query heads sharing a KV head are laid out as that
        head's "query positions", so sdpa reads each K/V head once instead of expanding it per query head."""
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        out = torch.empty_like(q)
        for start, end, length in meta.decode_buckets:
            n, num_blocks = end - start, -(-length // block_size)
            blocks = meta.decode_block_tables[start:end, :num_blocks].reshape(-1)
            keys = self._gather("k", k_cache, blocks).view(n, num_blocks * block_size, num_kv_heads, head_dim)
            values = self._gather("v", v_cache, blocks).view(n, num_blocks * block_size, num_kv_heads, head_dim)
            q_pos = (meta.decode_context_lens[start:end] - 1)[:, None, None, None]
            k_pos = torch.arange(length, device=q.device)[None, None, None, :]
            query = q[start:end].view(n, num_kv_heads, -1, head_dim)
            o = F.scaled_dot_product_attention(query, keys[:, :length].transpose(1, 2),
                                               values[:, :length].transpose(1, 2), attn_mask=self._mask(q_pos, k_pos),
                                               scale=self.scale)
            out[start:end] = o.reshape(n, -1, head_dim)
        return out

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal (and sliding-window) visibility of key positions from query positions."""
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask = mask & (k_pos > q_pos - self.sliding_window)
        return mask

    def _gather(self, name: str, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Copies the listed blocks into a reused buffer: [len(blocks), block_size, kv_heads, head_dim].

        index_select copies whole blocks at memory speed; advanced indexing (cache[blocks]) is ~10x slower on CPU.
        """
        shape = (blocks.numel(), *cache.shape[1:])
        numel = shape[0] * cache[0].numel()
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self._workspace[name] = torch.empty(numel, dtype=cache.dtype, device=cache.device)
        return torch.index_select(cache, 0, blocks, out=buf[:numel].view(shape))
