"""The engine's configuration: frozen dataclasses, each class takes only its own part.

Values computed from the model or the machine (the number of KV blocks, the context length) are returned by the
code that computes them, never written back here.
"""

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("torch", "triton")
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run, on what device, in what precision and with which kernels."""

    model: str = "smollm2"
    device: str = "cpu"
    # "auto": float32 on CPU (exact parity with HF), bfloat16 on GPU.
    dtype: str = "auto"
    # None: the model's own max_position_embeddings.
    max_model_len: int | None = None
    seed: int = 0
    # "torch" (CPU and GPU) or "triton" (GPU kernels; on CPU only under TRITON_INTERPRET=1, for tests).
    attention_backend: str = "torch"
    # Decode steps replay CUDA graphs on CUDA with the triton backend at one rank; True keeps every step eager.
    enforce_eager: bool = False
    # The largest decode batch captured as a graph; larger batches (and any batch with a prefill) run eagerly.
    max_graph_batch_size: int = 256
    # LoRA adapters requests may name (SamplingParams.lora): name -> PEFT folder, all loaded at start (lora.py).
    lora_modules: dict[str, str] = field(default_factory=dict)
    # Adapters loaded as requests name them (SamplingParams.lora_path) that the engine keeps; past that many, the
    # least recently used one no request is running is dropped (adapter_cache.py).
    max_loras: int = 8

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 (got {self.max_loras})")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention_backend!r} "
                             f"(choose from {', '.join(ATTENTION_BACKENDS)})")
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1 (got {self.max_graph_batch_size})")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    # An explicit block count wins; else the cache takes kv_cache_memory_gb (CPU) or
    # gpu_memory_utilization of the device's free memory (GPU).
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    # How long a prefill group keeps a finished prompt's blocks pinned for a decode group to fetch, once the
    # handoff's receiver has claimed them; unclaimed, only kv_claim_s (a caller that left while its prefill call
    # was on its way to a replica never receives the handoff, and nobody would release the blocks).
    kv_lease_s: float = 30.0
    kv_claim_s: float = 5.0
    # A KV transfer (or opening a channel) that takes longer fails, and the decode group recomputes the prompt.
    kv_transfer_timeout_s: float = 30.0
    # Open KV channels per rank (one per peer group); opening one more closes the least recently used.
    max_kv_channels: int = 8
    # Host memory per rank that keeps cached blocks the KV cache evicts, to copy back rather than recompute
    # (host_blocks.py); 0 turns the host tier off.
    kv_offload_gb: float = 0.0

    def __post_init__(self) -> None:
        if self.kv_offload_gb < 0:
            raise ValueError(f"kv_offload_gb must be >= 0 (got {self.kv_offload_gb})")


@dataclass(frozen=True)
class SchedulerConfig:
    """What one engine step may do."""

    max_num_seqs: int = 64
    # The per-step token budget; a prompt longer than what is left of it is prefilled in chunks.
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    # "fcfs": requests run in arrival order; "priority": by SamplingParams.priority (lower first), then arrival,
    # and the lowest-priority running sequence is preempted first when blocks run out.
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r} (choose from "
                             f"{', '.join(SCHEDULING_POLICIES)})")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram lookup (speculative.py), vLLM's "ngram" method by its names."""

    # Tokens guessed per step for each request; 0 turns guessing off.
    num_speculative_tokens: int = 0
    # The longest and shortest runs of the sequence's last tokens looked up earlier in it.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0 (got {self.num_speculative_tokens})")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max (got {self.prompt_lookup_min} and "
                             f"{self.prompt_lookup_max})")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
