"""Random LoRA adapters for a model folder, in PEFT's format, and the same adapters merged into a copy of the model.

The adapters are `tandem bench lora`'s (random A and B on the projections asked for); the merged copy, W +
scaling x B @ A in every projection the adapter targets, is what the adapter means, so HF transformers running the
merged copy is the reference for the engine running the adapter unmerged.
"""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cluster.bench.lora import write_random_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Adapter:
    folder: Path
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def write_adapter(folder: Path, model_dir: Path, targets: tuple[str, ...], rank: int, alpha: float, seed: int,
                  use_rslora: bool = False, layers: range | None = None, std: float = 0.04) -> Adapter:
    write_random_adapter(folder, model_dir, rank=rank, alpha=alpha, seed=seed, targets=targets, layers=layers,
                         use_rslora=use_rslora, std=std)
    return Adapter(folder, rank, alpha, use_rslora)


def merged_model(adapter: Adapter, model_dir: Path, out: Path) -> Path:
    """A copy of the model folder with the adapter merged into its weights."""
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update({key: value.to(torch.float32) for key, value in load_file(path).items()})
    lora = load_file(adapter.folder / "adapter_model.safetensors")
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[base] = weights[base] + adapter.scaling * (b @ a)
    save_file(weights, out / "model.safetensors")
    return out
