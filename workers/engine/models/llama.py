"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Granite, SmolLM2) over a paged KV cache.

One file covers them all: they differ only in config values (GQA, head_dim, qkv bias, sliding window, rope
scaling, tied embeddings, Granite's four multipliers), all read from the HF config, and in Qwen3's RMSNorm of each
query and key head before the rotary embedding. Module names follow HF's so checkpoint names map
directly, except the fused projections listed in PACKED_MODULES. Every layer that shards under tensor parallelism
takes the TensorParallel object; at size 1 the model is the plain single-device one.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from workers.engine.attention.backend import AttentionBackend
from workers.engine.attention.metadata import AttentionMetadata
from workers.engine.layers.embedding import VocabParallelEmbedding
from workers.engine.layers.fusion import SmallBatchFusion, norm_then_linear, row_linear, silu_mul_then_linear
from workers.engine.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from workers.engine.layers.norm import RMSNorm
from workers.engine.parallel import TensorParallel

# checkpoint module name -> (our fused module, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def classifies(config: PretrainedConfig) -> bool:
    """A *ForSequenceClassification checkpoint: a classifier or reward model on a Llama-family decoder."""
    return any(arch.endswith("ForSequenceClassification") for arch in getattr(config, "architectures", None) or [])


def attention_scale_of(config: PretrainedConfig) -> float:
    """Granite sets its own (attention_multiplier); the others scale by 1 / sqrt(head_dim)."""
    return getattr(config, "attention_multiplier", None) or head_dim_of(config) ** -0.5


def sliding_window_of(config: PretrainedConfig) -> int | None:
    """Mistral sets sliding_window; Qwen2 carries one too but applies it only with use_sliding_window."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    """Runs on this rank's query heads and the KV heads they read; o_proj sums the ranks' partial outputs."""

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, tp: TensorParallel,
                 fusion: SmallBatchFusion):
        super().__init__()
        self.head_dim = head_dim_of(config)
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias, tp)
        self.num_heads = self.qkv_proj.heads.num_heads
        self.num_kv_heads = self.qkv_proj.heads.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False), tp)
        # Qwen3: one weight per head dimension, shared by the heads, so every rank holds all of it.
        self.q_norm = self.k_norm = None
        if config.model_type == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.backend = backend
        self.fusion = fusion

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """qkv: qkv_proj's output, which the decoder layer computes with the norm before it."""
        q, k, v = qkv.split(self.qkv_proj.out_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = _per_head(self.q_norm, q), _per_head(self.k_norm, k)
        o = self.backend.forward(positions, q, k, v, kv_cache[0], kv_cache[1], meta)
        return row_linear(self.fusion, self.o_proj, o.flatten(1))


def _per_head(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over each head of x [T, heads, head_dim], as rows of one [T * heads, head_dim] matrix (the shape the
    GPU kernel takes)."""
    return norm(x.reshape(-1, x.shape[-1]))[0].view(x.shape)


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel, fusion: SmallBatchFusion):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias, tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp)
        self.fusion = fusion
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r} (Llama-family models use silu)")

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: gate_up_proj's output, which the decoder layer computes with the norm before it."""
        return silu_mul_then_linear(self.fusion, self.down_proj, gate_up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, tp: TensorParallel,
                 fusion: SmallBatchFusion):
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, tp, fusion)
        self.mlp = LlamaMLP(config, tp, fusion)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fusion = fusion
        # Granite scales what each block adds to the residual stream.
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)

    def forward(self, positions, x, residual, kv_cache, meta):
        qkv, residual = norm_then_linear(self.fusion, self.input_layernorm, self.self_attn.qkv_proj, x, residual)
        h = self._scaled(self.self_attn(positions, qkv, kv_cache, meta))
        gate_up, residual = norm_then_linear(self.fusion, self.post_attention_layernorm, self.mlp.gate_up_proj, h,
                                             residual)
        return self._scaled(self.mlp(gate_up)), residual

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, tp: TensorParallel,
                 fusion: SmallBatchFusion):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend, tp, fusion)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)  # Granite's

    def forward(self, input_ids, positions, kv_caches, meta):
        x, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.config = config
        # Shared by every layer, so the runner switches the fused small-batch projections on or off in one place.
        self.fusion = SmallBatchFusion()
        self.model = LlamaModel(config, backend, tp, self.fusion)
        # A sequence classifier (or reward model) has a small head, [classes, hidden], on its last token instead of
        # the language-model head; every rank holds it whole (its checkpoint name: "score.weight").
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False) if classifies(config) else None
        # Tied models read the embedding matrix directly instead of holding a second, aliased parameter.
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False) and self.score is None
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp) \
            if not self.tie_word_embeddings and self.score is None else None
        self.logits_scaling = getattr(config, "logits_scaling", 1.0)  # Granite divides its logits by it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    @property
    def generates(self) -> bool:
        """False for a classifier, and for an embedding model whose checkpoint has no head (models/loader.py)."""
        return self.tie_word_embeddings or self.lm_head is not None

    def drop_head(self) -> None:
        self.lm_head = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full [T, vocab] logits on every rank."""
        head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
        logits = head.logits(hidden)
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling
