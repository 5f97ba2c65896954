"""Linear layers that fuse projections reading the same input (q/k/v, gate/up) into one matmul.

The layer's `weight_loader` copies one checkpoint tensor into its own slice of the fused weight, so the loader
never needs to know how a layer is laid out.
"""

import torch
from torch import nn


class MergedLinear(nn.Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        offset = sum(self.out_sizes[:shard])
        param.data[offset:offset + self.out_sizes[shard]].copy_(loaded)
