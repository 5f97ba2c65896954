"""Loads an HF model folder (config.json + *.safetensors) into our model, tensor by tensor.

Each checkpoint tensor is opened as a lazy safetensors slice and handed to the owning layer's `weight_loader`,
which reads only the rows or columns its rank holds: a tensor-parallel rank never materializes more than its own
shard of any tensor, and at most one such shard beyond the model itself.

An embedding model's checkpoint is the decoder alone, saved from HF's LlamaModel, MistralModel, Qwen2Model or
Qwen3Model (e5-mistral, Qwen3-Embedding): its names lack the "model." prefix, and where its config does not tie the
embedding, it has no language-model head, so the model it loads into serves embeddings only.
"""

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from workers.engine.layers.weights import WeightSource, default_weight_loader
from workers.engine.models.llama import PACKED_MODULES

logger = logging.getLogger(__name__)

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
                target, shard = _target("model.embed_tokens.weight" if tied and name == "lm_head.weight" else
                                        _decoder_name(name))
                _copy(model, params, target, f.get_slice(name), shard)
                loaded.add(target)
    missing = set(params) - loaded
    if missing == {"lm_head.weight"}:
        logger.info("%s has no lm_head.weight: an embedding model, which serves embeddings only", model_dir)
        model.drop_head()
    elif missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for: {', '.join(sorted(missing)[:8])}")


def _decoder_name(name: str) -> str:
    """An embedding model's names ("layers.0.mlp.up_proj.weight") as the causal LM's ("model.layers...")."""
    return f"model.{name}" if name.startswith(("embed_tokens.", "layers.", "norm.")) else name


def _target(name: str) -> tuple[str, int | None]:
    for checkpoint_name, (fused, shard) in PACKED_MODULES.items():
        if f".{checkpoint_name}." in name:
            return name.replace(f".{checkpoint_name}.", f".{fused}."), shard
    return name, None


def _copy(model: nn.Module, params: dict[str, nn.Parameter], name: str, source: WeightSource,
          shard: int | None) -> None:
    param = params.get(name)
    if param is None:
        raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
    # Parameters carry no loader of their own (materializing the meta-device model replaces them), so the
    # owning module provides it; modules that do not shard (norms) take the whole tensor.
    loader = getattr(model.get_submodule(name.rpartition(".")[0]), "weight_loader", default_weight_loader)
    try:
        with torch.no_grad():
            if shard is None:
                loader(param, source)
            else:
                loader(param, source, shard)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
