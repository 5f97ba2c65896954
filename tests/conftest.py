"""Shared model fixtures: the real embedded SmolLM2 and tiny random models of each supported architecture.

The tiny models keep SmolLM2's vocabulary and tokenizer so every test can build prompts the same way, while
their architecture-specific parts (untied llama3-scaled RoPE, tied embeddings with QKV bias, a sliding window
narrower than the test prompts and a head_dim that differs from hidden_size / heads) are each set so that a bug
in the matching engine code changes the output.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from workers.engine.model_store import resolve_model

pytest_plugins = ["tests.redis_fixture"]

TINY_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "granite")

_TINY_SEED = 1234
# At 0.1 and below the tied-embedding qwen2 model greedily repeats one token most of the time; at 0.2 every
# architecture produces varied greedy output with top-two logit gaps far above float32 rounding.
_TINY_WEIGHT_STD = 0.2

_TINY_COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def _tiny_config(arch: str) -> PretrainedConfig:
    if arch == "llama":
        # original_max_position_embeddings is tiny so the llama3 frequency scaling changes short prompts too.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**_TINY_COMMON, tie_word_embeddings=False, rope_parameters=rope)
    if arch == "qwen2":
        return Qwen2Config(**_TINY_COMMON, tie_word_embeddings=True)
    if arch == "qwen3":
        # head_dim apart from hidden_size / heads, as Qwen3's (128 heads' worth of 1024 hidden in Qwen3-0.6B).
        return Qwen3Config(**_TINY_COMMON, tie_word_embeddings=True, head_dim=32)
    if arch == "granite":
        # Multipliers far from 1, so a model that left one out would not match.
        return GraniteConfig(**_TINY_COMMON, tie_word_embeddings=True, embedding_multiplier=3.0,
                             residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=0.5)
    if arch == "mistral":
        return MistralConfig(**_TINY_COMMON, tie_word_embeddings=False, sliding_window=64, head_dim=32)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {TINY_ARCHS}")


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """Overwrites every weight, because HF's init zeroes biases and sets norms to one, which would hide bugs there."""
    generator = torch.Generator().manual_seed(_TINY_SEED)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(_TINY_WEIGHT_STD * noise)


def build_tiny_model(arch: str, folder: Path, tokenizer_source: Path) -> Path:
    torch.manual_seed(_TINY_SEED)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
    _randomize(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


def build_tiny_classifier(arch: str, labels: tuple[str, ...], folder: Path, tokenizer_source: Path) -> Path:
    """The tiny decoder of `arch` with a *ForSequenceClassification head of `labels` (one label: a reward
    model's single score)."""
    torch.manual_seed(_TINY_SEED)
    config = _tiny_config(arch)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    _randomize(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


def with_generation_config(model: Path, folder: Path, config: dict) -> Path:
    """`model`'s files linked into `folder`, with `config` as its generation_config.json."""
    for path in model.iterdir():
        if path.name != "generation_config.json":
            (folder / path.name).symlink_to(path)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Callable[[str], Path]:
    """Returns `make(arch) -> folder`; each architecture is built at most once per test session."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[arch] = build_tiny_model(arch, folder, smollm2_path)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_classifier_factory(tmp_path_factory: pytest.TempPathFactory,
                            smollm2_path: Path) -> Callable[[str, tuple[str, ...]], Path]:
    """Returns `make(arch, labels) -> folder`, each built at most once per test session."""
    built: dict[tuple[str, tuple[str, ...]], Path] = {}

    def make(arch: str, labels: tuple[str, ...]) -> Path:
        if (arch, labels) not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-classifier")
            built[arch, labels] = build_tiny_classifier(arch, labels, folder, smollm2_path)
        return built[arch, labels]

    return make


# Not Serve's default port 8000, where a cluster running on this machine may listen.
SERVE_HTTP_HOST, SERVE_HTTP_PORT = "127.0.0.1", 18000
SERVE_HTTP_URL = f"http://{SERVE_HTTP_HOST}:{SERVE_HTTP_PORT}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance for the tests that start worker groups or Serve apps. More logical CPUs than
    the machine has: rank actors take fractions and mostly wait, and a 2-core CI machine must fit several.

    Serve starts here, once, with its HTTP proxy at SERVE_HTTP_URL: the modules' apps take turns behind that
    proxy instead of each restarting Serve for a port of its own."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": SERVE_HTTP_HOST, "port": SERVE_HTTP_PORT})
    yield
    ray.shutdown()
