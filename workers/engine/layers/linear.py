"""Megatron-style tensor-parallel linear layers; at tensor parallel size 1 each is one plain matmul.

A column-parallel layer splits its output features across ranks and needs no communication: attention runs on
the local heads, the MLP activation on the local features. The row-parallel layer that follows splits its input
features the same way and sums the partial outputs with one all-reduce, so each attention block and each MLP
costs one all-reduce in total.

Projections reading the same input (q/k/v, gate/up) are fused into one matmul. Each layer's `weight_loader`
takes one full checkpoint tensor (or a lazy slice of it) and copies only this rank's rows or columns into its
place, so the loader never needs to know how a layer is laid out or sharded.

A layer that LoRA adapters change holds them in `lora` (lora.py), which adds their products for the step's rows
that run an adapter.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.layers.weights import (
    WeightSource,
    check_shape,
    default_weight_loader,
)
from workers.engine.parallel import TensorParallel, all_reduce, divide, shard_heads

if TYPE_CHECKING:
    from workers.engine.lora import LoRALayer


@dataclass(frozen=True)
class _Rows:
    """Rows [start, start + size) of a checkpoint tensor that has `total` rows."""

    total: int
    start: int
    size: int


class _ShardedColumns(nn.Module):
    """Holds, for each fused projection in order, one block of rows cut from its checkpoint tensor."""

    lora: "LoRALayer | None" = None

    def __init__(self, in_features: int, rows: list[_Rows], bias: bool):
        super().__init__()
        self.rows = rows
        self.out_sizes = [r.size for r in rows]
        self.weight = nn.Parameter(torch.empty(sum(self.out_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.out_sizes))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora.add(x, y)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard: int = 0) -> None:
        rows = self.rows[shard]
        check_shape(source, (rows.total, *param.shape[1:]))
        offset = sum(self.out_sizes[:shard])
        param.data[offset:offset + rows.size].copy_(source[rows.start:rows.start + rows.size])


class ColumnParallelLinear(_ShardedColumns):
    """Output features split evenly across ranks; y's local slice feeds the next layer as is.

    Pass one output size per fused projection (gate and up): each is split on its own, so a rank's output is
    [its gate slice, its up slice] and still splits into the projections in order.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TensorParallel):
        local = [divide(n, tp, "output features") for n in out_sizes]
        super().__init__(in_features, [_Rows(n, tp.rank * k, k) for n, k in zip(out_sizes, local)], bias)


class QKVParallelLinear(_ShardedColumns):
    """Fused q/k/v with this rank's query heads and the KV heads they read (see `shard_heads`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel):
        heads = shard_heads(num_heads, num_kv_heads, tp)
        q = _Rows(num_heads * head_dim, heads.first_head * head_dim, heads.num_heads * head_dim)
        kv = _Rows(num_kv_heads * head_dim, heads.first_kv_head * head_dim, heads.num_kv_heads * head_dim)
        super().__init__(hidden_size, [q, kv, kv], bias)
        self.heads = heads


class RowParallelLinear(nn.Module):
    """Input features split evenly across ranks; partial outputs are summed by an all-reduce.

    The bias is held whole by every rank and added once, after the sum, so it is not counted `size` times.
    """

    lora: "LoRALayer | None" = None

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.in_local = divide(in_features, tp, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp.size == 1 else None)
        if self.lora is not None:
            y = self.lora.add(x, y)  # a partial product, like the base one
        if self.tp.size == 1:
            return y
        y = all_reduce(y, self.tp)
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        if param is self.bias:
            default_weight_loader(param, source)
            return
        check_shape(source, (param.shape[0], self.in_features))
        start = self.tp.rank * self.in_local
        param.data.copy_(source[:, start:start + self.in_local])
