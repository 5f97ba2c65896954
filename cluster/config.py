"""The one place that reads the environment, config files and command-line flags.

Everything below cluster/ takes plain arguments; this module turns a YAML file (deploy/tandem.yaml documents
every key), flags and environment variables into them. A `ClusterConfig` is validated as it is built, and every
error names the field by its dotted path and shows the bad value, so a typo in a 40-line file is one line to fix.

Each field is both a YAML key and a flag: `block_size` is `--block-size`, `prefill.replicas` is
`--prefill-replicas`, `routing.transfer_block` is `--routing-transfer-block`. Flags override the file, which
overrides the defaults.
"""

import argparse
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.autoscaling import AUTOSCALING_POLICY, AutoscalingTargets
from router.api_config import ApiConfig
from router.policy import RoutingWeights
from workers.engine.config import (
    ATTENTION_BACKENDS,
    SCHEDULING_POLICIES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from workers.engine.model_store import default_cache_dir


def cache_dir() -> Path:
    """Where converted models live: $TANDEM_CACHE_DIR, else ~/.cache/tandem."""
    return Path(os.environ["TANDEM_CACHE_DIR"]) if os.environ.get("TANDEM_CACHE_DIR") else default_cache_dir()


PREFILL_ROUTERS = ("prefix-cache", "round-robin", "power-of-two", "prefix-tree", "sglang")


class ConfigError(ValueError):
    """A config that cannot run; the message starts with the field's dotted path."""


def _field(default: Any, doc: str, **checks: Any) -> Any:
    """A config field with its flag help and its range checks: min, above (exclusive), max, choices."""
    return field(default=default, metadata={"help": doc, **checks})


def _check_ranges(config: Any) -> None:
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(meta['choices'])} (got {value!r})")
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{f.name} must be >= {meta['min']} (got {value!r})")
        if "above" in meta and value <= meta["above"]:
            raise ConfigError(f"{f.name} must be > {meta['above']} (got {value!r})")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{f.name} must be <= {meta['max']} (got {value!r})")


@dataclass(frozen=True)
class PoolConfig:
    """One Serve deployment's replicas and back-pressure. A replica of a worker pool is one TP group."""

    replicas: int = _field(1, "replicas (the initial count when autoscaling)", min=1)
    min_replicas: int | None = _field(None, "autoscale between min_replicas and max_replicas (set both)", min=0)
    max_replicas: int | None = _field(None, "autoscaling's upper bound", min=1)
    target_ongoing_requests: float = _field(32.0, "requests per replica autoscaling aims for", above=0)
    max_ongoing_requests: int = _field(64, "requests one replica serves at once", min=1)
    max_queued_requests: int | None = _field(None, "requests waiting per caller before new ones are refused "
                                                   "(null: no limit)", min=1)

    def __post_init__(self) -> None:
        _check_ranges(self)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError(f"min_replicas and max_replicas must be set together "
                              f"(got {self.min_replicas!r} and {self.max_replicas!r})")
        if self.min_replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ConfigError(f"replicas must be between min_replicas={self.min_replicas} and "
                              f"max_replicas={self.max_replicas} (got {self.replicas!r})")

    def serve_options(self, autoscaling: AutoscalingTargets | None = None) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...)`: a fixed replica count, or Serve's autoscaling; with
        `autoscaling`, by the pools' policy (cluster/autoscaling.py) instead of Serve's request count."""
        options: dict[str, Any] = dict(max_ongoing_requests=self.max_ongoing_requests,
                                       max_queued_requests=-1 if self.max_queued_requests is None
                                       else self.max_queued_requests)
        if self.min_replicas is None:
            return {**options, "num_replicas": self.replicas}
        scaling = dict(min_replicas=self.min_replicas, initial_replicas=self.replicas, max_replicas=self.max_replicas,
                       target_ongoing_requests=self.target_ongoing_requests)
        if autoscaling is not None:
            # The pools' policy smooths its own decisions, so Serve's delays on top are off.
            scaling.update(metrics_interval_s=autoscaling.metrics_interval_s,
                           look_back_period_s=autoscaling.look_back_s, upscale_delay_s=0.0, downscale_delay_s=0.0,
                           policy=dict(policy_function=AUTOSCALING_POLICY, policy_kwargs=asdict(autoscaling)))
        return {**options, "autoscaling_config": scaling}


@dataclass(frozen=True)
class ClusterConfig:
    """The whole cluster: the model and engine every group runs, the pools, routing and the endpoints."""

    model: str = _field("smollm2", "'smollm2' (embedded SmolLM2-135M-Instruct) or a local HF model folder")
    served_model_name: str | None = _field(None, "the model's name in the APIs, which requests give as `model` "
                                                 "(null: the model folder's name, or 'smollm2')")
    generation_config: str = _field("auto", "auto: a request's unset temperature, top_p, top_k, min_p, "
                                            "repetition_penalty and max_tokens take the model's "
                                            "generation_config.json values (as vLLM and HF's generate do); none: "
                                            "Tandem's defaults", choices=("auto", "none"))
    lora_modules: dict[str, str] = field(default_factory=dict, metadata={"help": (
        "LoRA adapters (PEFT folders) every group loads at start, which requests name as `model`: "
        "NAME=PATH[,NAME=PATH...] as a flag, a mapping of names to paths in YAML")})
    lora_dir: str | None = _field(None, "a folder of LoRA adapters, each in a subfolder named as requests name it "
                                        "(<lora_dir>/<name>): a request naming an adapter not loaded yet loads it "
                                        "from there (vLLM's filesystem LoRA resolver); an absolute path every "
                                        "worker group can read")
    max_loras: int = _field(8, "LoRA adapters loaded while the cluster runs (lora_dir, api.allow_runtime_lora) "
                               "that a group keeps; past that, the least recently used one no request runs is "
                               "dropped, and read again when a request names it", min=1)
    device: str = _field("cpu", "where every rank runs", choices=("cpu", "cuda"))
    dtype: str = _field("auto", "weights and KV precision; auto = float32 on CPU, bfloat16 on GPU",
                        choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: int | None = _field(None, "context length (null: the model's)", min=1)
    seed: int = _field(0, "the engine's default random seed")
    attention_backend: str = _field("torch", "attention kernels: torch (CPU and GPU) or triton (GPU)",
                                    choices=ATTENTION_BACKENDS)
    enforce_eager: bool = _field(False, "run every decode step eagerly; else decode steps replay CUDA graphs "
                                        "(on cuda with the triton backend)")
    tensor_parallel_size: int = _field(1, "ranks per worker group; the model's heads must divide by it", min=1)
    num_cpus_per_rank: float = _field(1.0, "Ray CPUs each rank reserves", above=0)
    block_size: int = _field(16, "tokens per KV block (the unit of caching, hashing and transfer)", min=1)
    num_kv_blocks: int | None = _field(None, "KV blocks per group (null: sized from memory)", min=1)
    kv_cache_memory_gb: float = _field(2.0, "KV cache size per rank on CPU", above=0)
    gpu_memory_utilization: float = _field(0.85, "share of free GPU memory the KV cache takes", above=0, max=1)
    enable_prefix_caching: bool = _field(True, "reuse cached KV blocks of equal prefixes")
    kv_offload_gb: float = _field(0.0, "host memory per rank that keeps cached blocks the KV cache evicts, copied "
                                       "back for a later prompt with that prefix instead of recomputed (0: off)", min=0)
    max_num_seqs: int = _field(64, "most sequences in one batch", min=1)
    max_num_batched_tokens: int = _field(1024, "per-step token budget; longer prompts prefill in chunks", min=1)
    enable_chunked_prefill: bool = _field(True, "split prompts longer than the step budget")
    scheduling_policy: str = _field("fcfs", "fcfs: requests run in arrival order; priority: by each request's "
                                            "priority (lower first), then arrival, the lowest preempted first",
                                    choices=SCHEDULING_POLICIES)
    num_speculative_tokens: int = _field(0, "speculative decoding by n-gram lookup: tokens guessed per step for "
                                            "each request, kept where the model agrees (0: off)", min=0)
    prompt_lookup_max: int = _field(4, "the longest run of a sequence's last tokens looked up earlier in it", min=1)
    prompt_lookup_min: int = _field(2, "the shortest such run", min=1)
    kv_lease_s: float = _field(30.0, "how long a prefill group pins a finished prompt's blocks once the handoff "
                                     "is claimed", above=0)
    kv_claim_s: float = _field(5.0, "how long it pins them until the handoff is claimed (a caller that left while "
                                    "its prefill call was on its way never claims it)", above=0)
    kv_transfer_timeout_s: float = _field(30.0, "a slower KV transfer fails and decode recomputes", above=0)
    max_kv_channels: int = _field(8, "open KV channels per rank", min=1)
    step_timeout_s: float = _field(60.0, "a group whose step makes no progress (finishes no model layer) for longer "
                                         "is taken as hung: its ranks are ended, its requests move to another group "
                                         "and Serve replaces it", above=0)
    disaggregate: bool = _field(True, "separate prefill and decode pools; off: the decode pool does both")
    prefill_router: str = _field("prefix-cache", "how prefill replicas are chosen: prefix-cache (Tandem's cost), or "
                                                 "for comparison round-robin, power-of-two (Serve's default), "
                                                 "prefix-tree (Ray's PrefixCacheAffinityRouter style), sglang",
                                 choices=PREFILL_ROUTERS)
    conditional_disaggregation: bool = _field(True, "with prefix-cache routing, a decode group that holds most of "
                                                    "a prompt prefills the rest itself instead of the prefill pool")
    ingress: PoolConfig = field(default_factory=lambda: PoolConfig(max_ongoing_requests=256))
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    routing: RoutingWeights = field(default_factory=RoutingWeights)
    autoscaling: AutoscalingTargets = field(default_factory=AutoscalingTargets)
    redis_url: str | None = _field(None, "Redis for KV events (null: start a local redis-server)")
    host: str = _field("0.0.0.0", "address the gRPC and HTTP endpoints listen on")
    grpc_port: int = _field(50051, "gRPC port", min=1, max=65535)
    http_port: int = _field(8000, "HTTP port: the OpenAI-compatible API, /health and /metrics", min=1, max=65535)
    drain_timeout_s: float = _field(30.0, "on shutdown, how long requests in flight may take to finish while new "
                                          "ones are refused", min=0)
    api: ApiConfig = field(default_factory=ApiConfig)

    def __post_init__(self) -> None:
        _check_ranges(self)
        if self.grpc_port == self.http_port:
            raise ConfigError(f"grpc_port and http_port must differ (both {self.grpc_port})")
        served = self.served_model_name or Path(self.model).name
        if served in self.lora_modules:
            raise ConfigError(f"lora_modules: the adapter name {served!r} is the model's own; name it otherwise")
        if self.lora_dir is not None and not self.lora_dir.startswith("/"):
            raise ConfigError(f"lora_dir must be an absolute path, the same wherever a worker group runs (got "
                              f"{self.lora_dir!r})")
        if self.step_timeout_s <= self.kv_transfer_timeout_s:
            raise ConfigError(f"step_timeout_s must exceed kv_transfer_timeout_s: a KV transfer is one step of the "
                              f"engine (got {self.step_timeout_s} and {self.kv_transfer_timeout_s})")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"prompt_lookup_min must be <= prompt_lookup_max (got {self.prompt_lookup_min} and "
                              f"{self.prompt_lookup_max})")

    def to_engine_config(self, model: str | None = None) -> EngineConfig:
        """The engine config every rank runs; `model` replaces self.model once the caller has resolved it to a
        folder (resolve_model(config.model, cache_dir())), so no rank converts the embedded model itself."""
        return EngineConfig(
            model=ModelConfig(model=model or self.model, device=self.device, dtype=self.dtype,
                              max_model_len=self.max_model_len, seed=self.seed,
                              attention_backend=self.attention_backend, enforce_eager=self.enforce_eager,
                              lora_modules=dict(self.lora_modules), max_loras=self.max_loras),
            cache=CacheConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                              kv_cache_memory_gb=self.kv_cache_memory_gb,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching, kv_lease_s=self.kv_lease_s,
                              kv_claim_s=self.kv_claim_s,
                              kv_transfer_timeout_s=self.kv_transfer_timeout_s, max_kv_channels=self.max_kv_channels,
                              kv_offload_gb=self.kv_offload_gb),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      enable_chunked_prefill=self.enable_chunked_prefill,
                                      policy=self.scheduling_policy),
            speculative=SpeculativeConfig(num_speculative_tokens=self.num_speculative_tokens,
                                          prompt_lookup_max=self.prompt_lookup_max,
                                          prompt_lookup_min=self.prompt_lookup_min),
        )


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ClusterConfig:
    """The config from a YAML file (or none), with `overrides` ({"prefill.replicas": 2, ...}) on top."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        *sections, name = dotted.split(".")
        target = data
        for section in sections:
            if target.get(section) is None:
                target[section] = {}
            target = target[section]
            if not isinstance(target, dict):
                raise ConfigError(f"{section} must be a mapping of keys to values (got {target!r})")
        target[name] = value
    return _build(ClusterConfig, data, "")


def config_from_mapping(data: Mapping[str, Any]) -> ClusterConfig:
    """The config from nested plain data with tandem.yaml's keys (a Serve config's application `args`)."""
    return _build(ClusterConfig, dict(data), "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (--block-size, --prefill-replicas, --no-disaggregate, ...) and --config FILE."""
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML cluster config (see deploy/tandem.yaml)")
    groups: dict[str, Any] = {}
    for flag in _flags():
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        names = ["--" + flag.dotted.replace("_", "-").replace(".", "-"), *_VLLM_SPELLINGS.get(flag.dotted, [])]
        if flag.hint is bool:
            groups[flag.group].add_argument(*names, dest=flag.dotted, default=None, help=flag.help,
                                            action=argparse.BooleanOptionalAction)
        else:
            groups[flag.group].add_argument(*names, dest=flag.dotted, default=None, help=flag.help,
                                            metavar=flag.dotted.rsplit(".", 1)[-1].upper())


# vLLM's spellings of the same settings, which its users type.
_VLLM_SPELLINGS = {"tensor_parallel_size": ["-tp"], "api.api_key": ["--api-key"],
                   "api.tool_call_parser": ["--tool-call-parser"], "api.reasoning_parser": ["--reasoning-parser"]}


def from_args(args: argparse.Namespace) -> ClusterConfig:
    """The config from --config FILE with every flag given on the command line on top."""
    overrides = {}
    for flag in _flags():
        raw = getattr(args, flag.dotted, None)
        if raw is not None:
            # Strings stay as typed (a model folder named "yes" is not a boolean); numbers and null are read as YAML.
            overrides[flag.dotted] = raw if flag.hint in (bool, str, str | None) else \
                named_paths(raw) if flag.hint == dict[str, str] else yaml.safe_load(raw)
    return load_config(args.config, overrides)


def named_paths(raw: str) -> dict[str, str] | str:
    """NAME=PATH pairs, separated by commas or spaces (vLLM's --lora-modules), as a mapping; text that is not
    such pairs is returned as it is, for the field's check to refuse with the field's name."""
    pairs = [pair.partition("=") for pair in raw.replace(",", " ").split()]
    if not all(name and sep and path for name, sep, path in pairs):
        return raw
    return {name: path for name, _, path in pairs}


@dataclass(frozen=True)
class _Flag:
    group: str
    dotted: str  # the field's path: "block_size", "prefill.replicas"
    hint: Any
    help: str


def _flags() -> list[_Flag]:
    """A flag for every field, sections flattened, its help ending with the default."""
    defaults, flags = ClusterConfig(), []
    for top in fields(ClusterConfig):
        hint = _hint(ClusterConfig, top.name)
        if not is_dataclass(hint):
            flags.append(_Flag("cluster", top.name, hint, _help(top, getattr(defaults, top.name))))
            continue
        for f in fields(hint):
            flags.append(_Flag(f"{top.name} ({hint.__name__})", f"{top.name}.{f.name}", _hint(hint, f.name),
                               _help(f, getattr(getattr(defaults, top.name), f.name))))
    return flags


def _help(f: Field, default: Any) -> str:
    shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("\n...\n").strip()
    return f"{f.metadata.get('help', 'weight in token-equivalents, see router/policy.py')} (default: {shown})"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values (got {data!r})")
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the config dataclass `cls` from plain data, every error naming the field's dotted path.

    An empty section (`prefill:` with every line below it commented out) keeps its defaults."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix[:-1]} must be a mapping of keys to values (got {data!r})")
    names = [f.name for f in fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        where = f" in {prefix[:-1]}" if prefix else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys{where}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = _hint(cls, name)
        kwargs[name] = (_build(hint, value, f"{prefix}{name}.") if is_dataclass(hint)
                        else _checked(value, hint, prefix + name))
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _checked(value: Any, hint: Any, name: str) -> Any:
    """`value` if it has the field's type (an integer also passes as a number), else a ConfigError."""
    if hint == dict[str, str]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                     for k, v in value.items()):
            raise ConfigError(f"{name} must be a mapping of names to paths, or NAME=PATH pairs as a flag "
                              f"(got {value!r})")
        return dict(value)
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if type(value) is kind or (kind is float and type(value) is int):
        return kind(value)
    raise ConfigError(f"{name} must be {_KINDS[kind]}{' or null' if optional else ''} (got {value!r})")
