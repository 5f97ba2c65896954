"""Random LoRA adapters for a model folder, in PEFT's format, and the same adapters merged into a copy of the model.

An adapter here is what `peft` saves (adapter_config.json, adapter_model.safetensors with PEFT's key names); the
merged copy, W + scaling x B @ A in every projection the adapter targets, is what the adapter means, so HF
transformers running the merged copy is the reference for the engine running the adapter unmerged.
"""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Adapter:
    folder: Path
    targets: tuple[str, ...]
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def write_adapter(folder: Path, model_dir: Path, targets: tuple[str, ...], rank: int, alpha: float, seed: int,
                  use_rslora: bool = False, layers: range | None = None, std: float = 0.04) -> Adapter:
    """Random A and B (PEFT initialises B to zero, which would change nothing) for `targets` in `layers` (all by
    default)."""
    weights = _weights(model_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for i in layers if layers is not None else range(num_layers):
        for target in targets:
            out_features, in_features = weights[_base_key(i, target)].shape
            prefix = f"base_model.model.{_base_key(i, target).removesuffix('.weight')}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": rank,
              "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
              "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return Adapter(folder, targets, rank, alpha, use_rslora)


def merged_model(adapter: Adapter, model_dir: Path, out: Path) -> Path:
    """A copy of the model folder with the adapter merged into its weights."""
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    weights = _weights(model_dir)
    lora = load_file(adapter.folder / "adapter_model.safetensors")
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[base] = weights[base] + adapter.scaling * (b @ a)
    save_file(weights, out / "model.safetensors")
    return out


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return {key: value.to(torch.float32) for key, value in weights.items()}


def _base_key(layer: int, target: str) -> str:
    block = "self_attn" if target in ATTENTION else "mlp"
    return f"model.layers.{layer}.{block}.{target}.weight"
