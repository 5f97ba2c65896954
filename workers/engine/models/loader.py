"""Loads an HF model folder (config.json + *.safetensors) into our model, tensor by tensor.

safetensors opens each file lazily, so at most one checkpoint tensor is materialized beyond the model itself.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from workers.engine.models.llama import PACKED_MODULES

# Checkpoint tensors that have no counterpart in our model: rotary tables we compute ourselves.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: nn.Module, model_dir: Path, progress: bool = False) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    tied = getattr(model, "tie_word_embeddings", False)
    for path in tqdm(files, desc="Loading weights", unit="file", disable=not progress or len(files) < 2):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(_SKIPPED_SUFFIXES):
                    continue
                # A tied checkpoint may store the shared matrix under either name (or both, equal).
                target, shard = _target("model.embed_tokens.weight" if tied and name == "lm_head.weight" else name)
                _copy(model, params, target, f.get_tensor(name), shard)
                loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for: {', '.join(sorted(missing)[:8])}")


def _target(name: str) -> tuple[str, int | None]:
    for checkpoint_name, (fused, shard) in PACKED_MODULES.items():
        if f".{checkpoint_name}." in name:
            return name.replace(f".{checkpoint_name}.", f".{fused}."), shard
    return name, None


def _copy(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
          shard: int | None) -> None:
    param = params.get(name)
    if param is None:
        raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
    with torch.no_grad():
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
            param.copy_(tensor)
        else:
            model.get_submodule(name.rpartition(".")[0]).weight_loader(param, tensor, shard)
