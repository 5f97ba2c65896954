"""LoRA adapters served beside the base model: each request names one (or none), and one batch mixes them.

An adapter is a PEFT folder (adapter_config.json and adapter_model.safetensors), the format `peft` saves and the
Hub holds. Its low-rank pairs stay unmerged, so the base weights serve every request and an adapter costs
rank x (in + out) numbers per projection: a projection adds (x A^T) B^T x scaling to the output rows of the
requests that name the adapter, as PEFT's LoraLayer and vLLM's LoRA layers do.

A fused projection (q/k/v, gate/up) holds its parts' pairs side by side, A stacked on the rank axis and B
block-diagonal, so it costs two matmuls whatever it fuses; a step that mixes adapters runs them all in two
(LoRALayer). Under tensor parallelism a column-parallel
projection keeps the rows of B that its output shard has, a row-parallel one the columns of A its input shard
has; the latter's product joins the partial output before the all-reduce, which sums it as it sums the base
product.

Adapters are loaded when the engine starts (engine lora_modules, as vLLM's --lora-modules), added to an engine
between steps (LLM.add_lora, as vLLM's), or loaded by the first request that names one with its folder (a cluster
that loads adapters while it runs; adapter_cache.py, which also drops them again). A name is its weights' for
good: a name dropped and read again has the same weights, which is what lets the name alone key its cached KV
blocks. Steps with an adapter's rows skip the fused small-batch kernels, which know only the base weights; their
decode steps replay CUDA graphs of their own (cuda_graphs.py).
"""

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from workers.engine.errors import LoRAError
from workers.engine.layers.fusion import SmallBatchFusion
from workers.engine.layers.linear import RowParallelLinear
from workers.engine.lora_folder import AdapterConfig, read_folder
from workers.engine.parallel import TensorParallel

logger = logging.getLogger(__name__)

# checkpoint projection -> (its module in a decoder layer, its part of that module)
PROJECTIONS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
               "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
               "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
               "down_proj": ("mlp.down_proj", 0)}

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT may keep the adapter's name before .weight)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class StepAdapters:
    """Which adapter each row of this step's tokens runs, set by the runner around a forward pass and read by every
    projection: `slot` where every row runs the same adapter, else `row_slots`, each row's slot (-1: the base
    model)."""

    def __init__(self) -> None:
        self.slot: int | None = None
        self.row_slots: torch.Tensor | None = None


class LoRALayer:
    """One projection's pairs, an (A, B^T) per adapter slot (None where the adapter leaves it alone), with the
    scaling folded into B.

    A step that mixes adapters runs them all at once: every adapter's A stacked on the rank axis, so x A^T is one
    matmul over every row and rank; each row keeps the ranks of its own adapter (a mask), and one matmul with the
    B's side by side adds them. The ranks a row does not keep are computed for nothing, which costs less than a
    gather, two matmuls and a scatter for each adapter in the step."""

    def __init__(self, step: StepAdapters):
        self.step = step
        self.pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # by adapter slot
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # A's, B^T's, each rank's slot

    def stack(self) -> None:
        """Lays the loaded pairs out for mixed steps, both on the rank axis; each pair is then a (contiguous)
        view into them."""
        present = [(slot, pair) for slot, pair in enumerate(self.pairs) if pair is not None]
        if not present:
            self.stacked = None
            return
        a = torch.cat([pair[0] for _, pair in present])
        bt = torch.cat([pair[1] for _, pair in present])
        slots = torch.cat([torch.full((pair[0].shape[0],), slot, device=a.device) for slot, pair in present])
        self.stacked = a, bt, slots
        start = 0
        for slot, (pair_a, _) in present:
            end = start + pair_a.shape[0]
            self.pairs[slot] = a[start:end], bt[start:end]
            start = end

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        step = self.step
        if step.slot is not None:
            pair = self.pairs[step.slot]
            return y if pair is None else y + F.linear(x, pair[0]) @ pair[1]
        if step.row_slots is None or self.stacked is None:
            return y
        a, bt, slots = self.stacked
        kept = (step.row_slots[:, None] == slots).to(x.dtype)
        return y + (F.linear(x, a) * kept) @ bt


class LoRAAdapters:
    """The engine's adapters, attached to every projection of the model; an adapter's slot is its place in
    `names`."""

    def __init__(self, model: nn.Module, modules: dict[str, str], tp: TensorParallel):
        self.names: tuple[str, ...] = ()
        self.step = StepAdapters()
        self.tp = tp
        self._layers = model.model.layers
        self._projections = {(i, path): _module(layer, path) for i, layer in enumerate(self._layers)
                             for path in {path for path, _ in PROJECTIONS.values()}}
        for module in self._projections.values():
            module.lora = LoRALayer(self.step)
        self._device = next(iter(self._projections.values())).weight.device
        for name, folder in modules.items():
            self.add(name, folder)

    def add(self, name: str, folder: Path | str) -> None:
        """Loads the adapter into the next slot. Every pair is read and checked before any layer takes one, so an
        adapter refused here leaves the others as they were."""
        if name in self.names:
            raise LoRAError(f"LoRA adapter {name!r} is loaded already; give another adapter another name")
        pairs = self._read(name, Path(folder))
        for module in self._projections.values():
            module.lora.pairs.append(pairs.get(module))
            if module in pairs:
                module.lora.stack()
        self.names += (name,)

    def remove(self, name: str) -> None:
        """Drops the adapter; those after it move up a slot, also in every layer's stacked pairs."""
        slot = self.names.index(name)
        for module in self._projections.values():
            module.lora.pairs.pop(slot)
            module.lora.stack()
        self.names = self.names[:slot] + self.names[slot + 1:]

    def _read(self, name: str, folder: Path) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (A, B^T) of each module the adapter changes."""
        config, path = read_folder(name, folder)
        parts: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                match = _KEY.search(key)
                if match is None:
                    raise LoRAError(f"LoRA adapter {name!r}: {key} is not a LoRA weight of a decoder layer's "
                                    f"projection ({', '.join(PROJECTIONS)}), the only ones adapters may change here")
                index, projection, which = int(match[1]), match[2], match[3]
                if projection not in PROJECTIONS or index >= len(self._layers):
                    raise LoRAError(f"LoRA adapter {name!r}: {key} names no projection of this model (it has "
                                    f"{len(self._layers)} layers of {', '.join(PROJECTIONS)})")
                path_in_layer, _ = PROJECTIONS[projection]
                parts.setdefault((index, path_in_layer), {}).setdefault(projection, {})[which] = f.get_tensor(key)
        if not parts:
            raise LoRAError(f"LoRA adapter {name!r}: {path} holds no LoRA weights")
        pairs = {}
        for (index, path_in_layer), found in parts.items():
            module = self._projections[index, path_in_layer]
            pairs[module] = self._shard(name, module, found, config, index)
        logger.info("LoRA adapter %r from %s: rank %d, scaling %g, %d projections", name, folder, config.rank,
                    config.scaling, sum(len(found) for found in parts.values()))
        return pairs

    def _shard(self, name: str, module: nn.Module, found: dict[str, dict[str, torch.Tensor]],
               config: AdapterConfig, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B^T) of one module, from its parts' full checkpoint pairs."""
        weight = module.weight
        a_parts, b_parts = [], []
        for projection, pair in found.items():
            where = f"layer {index} {projection}"
            if set(pair) != {"A", "B"}:
                raise LoRAError(f"LoRA adapter {name!r}: {where} has lora_{''.join(pair)} without its pair")
            a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32) * config.scaling
            if isinstance(module, RowParallelLinear):
                expected = ((a.shape[0], module.in_features), (weight.shape[0], a.shape[0]))
            else:
                rows = module.rows[PROJECTIONS[projection][1]]
                expected = ((a.shape[0], weight.shape[1]), (rows.total, a.shape[0]))
            if (tuple(a.shape), tuple(b.shape)) != expected:
                raise LoRAError(f"LoRA adapter {name!r}: {where} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                f"which do not fit this model ({expected[0]} and {expected[1]}): an adapter of "
                                f"another model?")
            if isinstance(module, RowParallelLinear):
                start = self.tp.rank * module.in_local
                a_parts.append(a[:, start:start + module.in_local])
                b_parts.append(b)
            else:
                part = PROJECTIONS[projection][1]
                rows = module.rows[part]
                local = torch.zeros(weight.shape[0], b.shape[1])
                offset = sum(module.out_sizes[:part])
                local[offset:offset + rows.size] = b[rows.start:rows.start + rows.size]
                a_parts.append(a)
                b_parts.append(local)
        a, bt = torch.cat(a_parts), torch.cat(b_parts, dim=1).T.contiguous()
        return a.to(dtype=weight.dtype, device=weight.device), bt.to(dtype=weight.dtype, device=weight.device)

    def slot_of(self, lora: str | None) -> int:
        """An adapter's slot, -1 for the base model."""
        return -1 if lora is None else self.names.index(lora)

    def slots(self, batch: Sequence[tuple[object, int]]) -> list[int]:
        """Each row's adapter slot for a step whose items (a sequence with a `lora`, its number of input rows) lie
        in order, as the runner lays out their tokens."""
        return [self.slot_of(seq.lora) for seq, n in batch for _ in range(n)]

    @contextmanager
    def rows(self, row_slots: torch.Tensor | list[int], fusion: SmallBatchFusion) -> Iterator[None]:
        """Runs the step's rows under their adapters, and without the fused small-batch kernels, which know only
        the base weights. A list that names one adapter alone runs that adapter's pair on every row; a tensor (a
        CUDA graph's static buffer) runs the mixed way, whatever it will hold."""
        if isinstance(row_slots, list) and len(set(row_slots)) == 1:
            self.step.slot = None if row_slots[0] == -1 else row_slots[0]
        else:
            self.step.row_slots = torch.as_tensor(row_slots, device=self._device)
        max_rows, fusion.max_rows = fusion.max_rows, 0
        try:
            yield
        finally:
            self.step.slot = self.step.row_slots = None
            fusion.max_rows = max_rows


def _module(layer: nn.Module, path: str) -> nn.Module:
    module = layer
    for name in path.split("."):
        module = getattr(module, name)
    return module
