"""Paged attention in plain torch: gathers each sequence's blocks and calls scaled_dot_product_attention.

Runs on CPU and GPU alike; it is the reference every faster backend is checked against.
"""

import torch
import torch.nn.functional as F

from workers.engine.attention.metadata import AttentionMetadata, PrefillMeta


class TorchAttentionBackend:
    def __init__(self, scale: float, sliding_window: int | None):
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
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
            keys = _gather(k_cache, p.block_table, p.context_len)
            values = _gather(v_cache, p.block_table, p.context_len)
        q_pos = torch.arange(p.context_len - p.query_len, p.context_len, device=q.device)[:, None]
        k_pos = torch.arange(p.context_len, device=q.device)[None, :]
        mask = self._mask(q_pos, k_pos)
        o = F.scaled_dot_product_attention(query, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                                           scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        n, max_blocks = meta.decode_block_tables.shape
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        length = meta.max_decode_context_len
        keys = k_cache[meta.decode_block_tables].view(n, max_blocks * block_size, num_kv_heads, head_dim)[:, :length]
        values = v_cache[meta.decode_block_tables].view(n, max_blocks * block_size, num_kv_heads, head_dim)[:, :length]
        q_pos = (meta.decode_context_lens - 1)[:, None, None]
        k_pos = torch.arange(length, device=q.device)[None, None, :]
        mask = self._mask(q_pos, k_pos).unsqueeze(1)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.squeeze(2)

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal (and sliding-window) visibility of key positions from query positions."""
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask = mask & (k_pos > q_pos - self.sliding_window)
        return mask


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    return cache[block_table].flatten(0, 1)[:length]
