"""What a layer's `weight_loader` reads from: a whole tensor, or a lazy safetensors slice.

The loader hands layers `safe_open(...).get_slice(name)`: indexing it reads only the indexed rows or columns
from the file, so a tensor-parallel rank never materializes more of a checkpoint tensor than its own shard.
Layers index sources with plain slices only, which tensors and safetensors slices both support.
"""

from typing import Protocol

import torch
from torch import nn


class WeightSource(Protocol):
    def __getitem__(self, index) -> torch.Tensor: ...


def shape_of(source: WeightSource) -> tuple[int, ...]:
    return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())


def check_shape(source: WeightSource, expected: tuple[int, ...]) -> None:
    """Compares the checkpoint's full shape with the full shape the layer expects, before any shard is cut."""
    if shape_of(source) != tuple(expected):
        raise ValueError(f"checkpoint shape {shape_of(source)} != model shape {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, source: WeightSource) -> None:
    """For parameters every rank holds whole (norms, replicated biases)."""
    check_shape(source, tuple(param.shape))
    param.data.copy_(source[:])
