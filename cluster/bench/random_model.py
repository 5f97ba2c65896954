"""Model folders with random weights of a real architecture, for benchmarks on machines that cannot download any.

Speed depends on shapes, not on weight values, so Llama-3.1-8B's config (written out here, as published with the
model) with random bfloat16 weights times like the real model. The folder is a normal HF one (config.json,
model.safetensors, tokenizer files) that the engine and HF transformers both load. Its tokenizer is a word-level
one whose token i is the text "<ti>": prompts are token ids, and text only matters to the detokenizer.
"""

import json
from pathlib import Path

# meta-llama/Llama-3.1-8B's config.json.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}
# The same architecture shrunk to run in a second on a CPU: the bench's smoke test.
TINY = dict(LLAMA_3_1_8B, bos_token_id=1, eos_token_id=2, head_dim=16, hidden_size=64, intermediate_size=128,
            max_position_embeddings=4096, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
            rope_scaling=dict(LLAMA_3_1_8B["rope_scaling"], original_max_position_embeddings=512), vocab_size=1024)

CONFIGS = {"llama-3.1-8b": LLAMA_3_1_8B, "tiny": TINY}
_WEIGHTS = "model.safetensors"


def build(name: str, folder: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Writes the folder once; a folder already holding this config's weights is reused as it is.

    The weights are drawn on `device` (a GPU draws 8B values in a blink; a CPU takes minutes) with the config's
    initializer_range as standard deviation, norms at one, so activations stay in range through every layer.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**CONFIGS[name])
    folder = Path(folder)
    if (folder / _WEIGHTS).exists() and AutoConfig.from_pretrained(folder).to_dict() == config.to_dict():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        weight = torch.randn(shape, generator=generator, device=device).mul_(config.initializer_range)
        tensors[key] = weight.to(torch.bfloat16).cpu()
    save_file(tensors, folder / _WEIGHTS, metadata={"format": "pt"})
    config.save_pretrained(folder)
    write_tokenizer(folder, config.vocab_size, config.bos_token_id, config.eos_token_id)
    return folder


def write_tokenizer(folder: Path, vocab_size: int, bos_token_id: int, eos_token_id: int) -> None:
    """A word-level tokenizer over "<t0>" ... "<t{vocab_size - 1}>", saved as HF tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<t0>", bos_token=f"<t{bos_token_id}>",
                            eos_token=f"<t{eos_token_id}>").save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos_token_id,
                                                               "eos_token_id": eos_token_id}) + "\n")
