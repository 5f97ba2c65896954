"""The cluster config as a specification: one typed config from a YAML file and flags (flags win), every mistake
reported as a ConfigError that names the field by its dotted path and shows the bad value."""

import argparse
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from cluster.autoscaling import AutoscalingTargets
from cluster.config import (
    ClusterConfig,
    ConfigError,
    PoolConfig,
    add_arguments,
    cache_dir,
    from_args,
    load_config,
)
from router.api_config import ApiConfig
from router.policy import RoutingWeights
from workers.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from workers.engine.llm import engine_config

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "tandem.yaml"
TOP_KEYS = [f.name for f in fields(ClusterConfig)]
POOL_KEYS = [f.name for f in fields(PoolConfig)]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tandem.yaml"
    path.write_text(text)
    return path


def error(path=None, **overrides) -> str:
    """The ConfigError message of loading `path` with `overrides`, where `prefill__replicas` is prefill.replicas."""
    with pytest.raises(ConfigError) as info:
        load_config(path, {key.replace("__", "."): value for key, value in overrides.items()})
    return str(info.value)


def parse(*argv: str) -> ClusterConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


# Defaults and the example file


def test_no_file_and_no_flags_give_the_defaults_a_laptop_runs():
    config = load_config()
    assert config == ClusterConfig()
    assert (config.model, config.device, config.tensor_parallel_size, config.block_size, config.disaggregate,
            config.prefill.replicas, config.decode.replicas, config.redis_url, config.grpc_port) == (
        "smollm2", "cpu", 1, 16, True, 1, 1, None, 50051)
    assert config.routing == RoutingWeights()


def test_the_example_file_documents_every_key_at_its_default():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert list(data) == TOP_KEYS
    assert [list(data[pool]) for pool in ("ingress", "prefill", "decode")] == [POOL_KEYS] * 3
    assert list(data["routing"]) == [f.name for f in fields(RoutingWeights)]
    assert load_config(EXAMPLE) == ClusterConfig()


def test_the_default_engine_config_is_the_engines_own_default():
    assert ClusterConfig().to_engine_config() == EngineConfig() == engine_config()


def test_every_engine_field_reaches_the_engine_config():
    config = load_config(None, {"model": "/models/llama", "device": "cuda", "dtype": "bfloat16", "max_model_len": 4096,
                                "seed": 7, "block_size": 32, "num_kv_blocks": 900, "kv_cache_memory_gb": 4,
                                "gpu_memory_utilization": 0.9, "enable_prefix_caching": False, "max_num_seqs": 128,
                                "max_num_batched_tokens": 2048, "enable_chunked_prefill": False, "kv_lease_s": 10,
                                "kv_claim_s": 2, "kv_offload_gb": 8,
                                "kv_transfer_timeout_s": 5, "max_kv_channels": 4, "num_speculative_tokens": 3,
                                "prompt_lookup_max": 5, "prompt_lookup_min": 1})
    assert config.to_engine_config() == EngineConfig(
        ModelConfig("/models/llama", "cuda", "bfloat16", 4096, 7),
        CacheConfig(32, 900, 4.0, 0.9, False, 10.0, 2.0, 5.0, 4, 8.0),
        SchedulerConfig(128, 2048, False), SpeculativeConfig(3, 5, 1))
    assert config.to_engine_config(model="/cache/resolved").model.model == "/cache/resolved"


def test_lora_adapters_come_as_a_mapping_in_a_file_or_as_name_path_pairs_in_a_flag(tmp_path):
    path = write(tmp_path, "lora_modules:\n  sql: /adapters/sql\n  chat: /adapters/chat\n")
    expected = {"sql": "/adapters/sql", "chat": "/adapters/chat"}
    assert load_config(path).lora_modules == expected
    assert parse("--lora-modules", "sql=/adapters/sql,chat=/adapters/chat").lora_modules == expected
    assert parse("--lora-modules", "sql=/adapters/sql chat=/adapters/chat").to_engine_config().model.lora_modules \
        == expected


@pytest.mark.parametrize("argv, message", [
    (("--lora-modules", "/adapters/sql"), r"lora_modules must be a mapping of names to paths, or NAME=PATH pairs "
                                          r"as a flag \(got '/adapters/sql'\)"),
    (("--lora-modules", "smollm2=/adapters/sql"), r"lora_modules: the adapter name 'smollm2' is the model's own"),
])
def test_lora_adapters_that_cannot_be_named_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_speculative_decoding_takes_its_lookup_lengths_in_order():
    assert error(prompt_lookup_min=5) == "prompt_lookup_min must be <= prompt_lookup_max (got 5 and 4)"
    assert parse("--num-speculative-tokens", "4").to_engine_config().speculative.num_speculative_tokens == 4


def test_a_step_may_not_time_out_before_the_kv_transfer_it_runs():
    assert error(kv_transfer_timeout_s=60) == ("step_timeout_s must exceed kv_transfer_timeout_s: a KV transfer is "
                                               "one step of the engine (got 60.0 and 60.0)")
    assert parse("--step-timeout-s", "90", "--kv-transfer-timeout-s", "60").step_timeout_s == 90


def test_the_attention_backend_and_cuda_graphs_reach_the_engine_from_a_file_or_flags(tmp_path):
    from_file = load_config(write(tmp_path, "attention_backend: triton\nenforce_eager: true\n"))
    from_flags = parse("--attention-backend", "triton", "--enforce-eager")
    for config in (from_file, from_flags):
        assert (config.to_engine_config().model.attention_backend, config.to_engine_config().model.enforce_eager) == (
            "triton", True)
    assert parse("--no-enforce-eager").to_engine_config().model.enforce_eager is False


def test_an_unknown_attention_backend_is_refused_by_name():
    assert error(attention_backend="flash") == "attention_backend must be one of torch, triton (got 'flash')"
    with pytest.raises(ConfigError, match=r"^attention_backend must be one of torch, triton \(got 'cuda'\)$"):
        parse("--attention-backend", "cuda")
    with pytest.raises(ValueError, match=r"^unknown attention backend 'flash' \(choose from torch, triton\)$"):
        ModelConfig(attention_backend="flash")


def test_tandem_generate_takes_the_attention_backend_and_enforce_eager_flags(capsys):
    from cluster.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--attention-backend", "triton", "--enforce-eager"])
    assert (args.attention_backend, args.enforce_eager) == ("triton", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "hi", "--attention-backend", "flash"])
    assert "argument --attention-backend: invalid choice: 'flash'" in capsys.readouterr().err


def test_tandem_generate_and_chat_take_the_speculative_decoding_flag():
    from cluster.cli import build_parser, engine_kwargs

    for command in (["generate", "--prompt", "hi"], ["chat"]):
        args = build_parser().parse_args([*command, "--num-speculative-tokens", "4"])
        assert engine_kwargs(args)["num_speculative_tokens"] == 4

# Files and overrides


def test_a_file_sets_nested_sections_and_leaves_the_rest_at_defaults(tmp_path):
    path = write(tmp_path, "model: /models/llama\ntensor_parallel_size: 2\nprefill:\n  replicas: 2\n"
                           "decode:\n  replicas: 4\n  min_replicas: 2\n  max_replicas: 8\n"
                           "routing:\n  transfer_block: 4\nredis_url: redis://redis:6379/0\n")
    config = load_config(path)
    assert config == ClusterConfig(model="/models/llama", tensor_parallel_size=2, prefill=PoolConfig(replicas=2),
                                   decode=PoolConfig(replicas=4, min_replicas=2, max_replicas=8),
                                   routing=RoutingWeights(transfer_block=4.0), redis_url="redis://redis:6379/0")


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "grpc_port: 6000\nprefill:\n  replicas: 2\n  max_ongoing_requests: 8\n")
    config = load_config(path, {"grpc_port": 7000, "prefill.replicas": 3})
    assert (config.grpc_port, config.prefill.replicas, config.prefill.max_ongoing_requests) == (7000, 3, 8)


def test_an_empty_file_or_section_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == ClusterConfig()
    assert load_config(write(tmp_path, "prefill:\n  # replicas: 2\n"), {"prefill.max_replicas": None}) == (
        ClusterConfig())


# Errors name the field and the bad value


def test_an_unknown_key_is_named_with_the_valid_ones():
    assert error(tensor_parallel=2) == f"unknown key tensor_parallel; valid keys: {', '.join(TOP_KEYS)}"
    assert error(prefill__replica=2) == f"unknown key prefill.replica; valid keys in prefill: {', '.join(POOL_KEYS)}"
    assert error(routing__transfer=1).startswith("unknown key routing.transfer; valid keys in routing: compute_token, ")


def test_a_value_of_the_wrong_type_is_named():
    assert error(grpc_port="50051x") == "grpc_port must be an integer (got '50051x')"
    assert error(prefill__replicas=True) == "prefill.replicas must be an integer (got True)"
    assert error(num_kv_blocks="many") == "num_kv_blocks must be an integer or null (got 'many')"
    assert error(enable_prefix_caching="yes") == "enable_prefix_caching must be true or false (got 'yes')"
    assert error(routing__running_seq="high") == "routing.running_seq must be a number (got 'high')"
    assert error(model=None) == "model must be a string (got None)"
    assert error(decode=3) == "decode must be a mapping of keys to values (got 3)"


def test_a_value_out_of_range_is_named():
    assert error(tensor_parallel_size=0) == "tensor_parallel_size must be >= 1 (got 0)"
    assert error(gpu_memory_utilization=1.5) == "gpu_memory_utilization must be <= 1 (got 1.5)"
    assert error(kv_lease_s=0) == "kv_lease_s must be > 0 (got 0.0)"
    assert error(device="tpu") == "device must be one of cpu, cuda (got 'tpu')"
    assert error(grpc_port=70000) == "grpc_port must be <= 65535 (got 70000)"
    assert error(grpc_port=8000) == "grpc_port and http_port must differ (both 8000)"
    assert error(routing__running_seq=-1) == "routing.running_seq must be >= 0 (got -1.0)"
    assert error(api__response_store_url="http://cache:6379") == \
        "api.response_store_url must be a Redis URL (redis://, rediss://, unix://...) (got 'http://cache:6379')"


def test_autoscaling_bounds_must_be_set_together_and_hold_the_replica_count():
    assert error(decode__min_replicas=1) == (
        "decode.min_replicas and max_replicas must be set together (got 1 and None)")
    assert error(decode__min_replicas=2, decode__max_replicas=4) == (
        "decode.replicas must be between min_replicas=2 and max_replicas=4 (got 1)")


def test_file_problems_are_config_errors(tmp_path):
    assert error(tmp_path / "missing.yaml") == f"cannot read config file {tmp_path / 'missing.yaml'}: " \
                                               "No such file or directory"
    assert error(write(tmp_path, "- a\n- b\n")) == (
        f"config file {tmp_path / 'tandem.yaml'} must hold a mapping of keys to values (got ['a', 'b'])")
    assert error(write(tmp_path, "model: [unclosed\n")).startswith(
        f"config file {tmp_path / 'tandem.yaml'} is not valid YAML: ")
    assert issubclass(ConfigError, ValueError)


# Command-line flags


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "tensor_parallel_size: 3\nprefill:\n  replicas: 2\nhttp_port: 9000\n")
    config = parse("--config", str(path), "--prefill-replicas", "4", "-tp", "2", "--no-disaggregate",
                   "--redis-url", "redis://r:6379/0", "--routing-transfer-block", "2.5", "--num-kv-blocks", "512")
    assert (config.tensor_parallel_size, config.prefill.replicas, config.disaggregate, config.redis_url,
            config.routing.transfer_block, config.num_kv_blocks, config.http_port) == (
        2, 4, False, "redis://r:6379/0", 2.5, 512, 9000)


def test_vllms_spellings_of_the_api_flags_work_too():
    config = parse("--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes", "--api-key", "k",
                   "--served-model-name", "acme/chat")
    assert (config.api.reasoning_parser, config.api.tool_call_parser, config.api.api_key,
            config.served_model_name) == ("deepseek_r1", "hermes", "k", "acme/chat")
    assert parse("--api-reasoning-parser", "qwen3").api.reasoning_parser == "qwen3"


def test_no_flags_give_the_file_or_the_defaults():
    assert parse() == ClusterConfig()
    assert parse("--config", str(EXAMPLE)) == ClusterConfig()


def test_every_field_has_a_flag_and_a_string_stays_a_string():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--model", "--block-size", "--disaggregate", "--no-disaggregate", "--ingress-max-ongoing-requests",
            "--decode-min-replicas", "--routing-local-compute-token", "--grpc-port", "--http-port", "--api-max-tokens",
            "--api-tls-cert-file"} <= flags
    sections = 3 * len(POOL_KEYS) + sum(len(fields(c)) for c in (RoutingWeights, AutoscalingTargets, ApiConfig))
    assert len([a for a in parser._actions if a.dest != "help"]) == 1 + len(TOP_KEYS) - 6 + sections
    assert parse("--model", "yes").model == "yes"


def test_a_bad_flag_value_is_reported_like_a_bad_file_value():
    with pytest.raises(ConfigError, match=r"^grpc_port must be an integer \(got 'abc'\)$"):
        parse("--grpc-port", "abc")


# Serve options and the environment


def test_a_pool_becomes_serve_deployment_options():
    assert PoolConfig(replicas=2).serve_options() == dict(num_replicas=2, max_ongoing_requests=64,
                                                          max_queued_requests=-1)
    assert PoolConfig(replicas=2, min_replicas=1, max_replicas=4, max_queued_requests=16).serve_options() == dict(
        max_ongoing_requests=64, max_queued_requests=16,
        autoscaling_config=dict(min_replicas=1, initial_replicas=2, max_replicas=4, target_ongoing_requests=32.0))
    targets = AutoscalingTargets(metrics_interval_s=0.5, look_back_s=3)
    assert PoolConfig(min_replicas=1, max_replicas=2).serve_options(targets)["autoscaling_config"] == dict(
        min_replicas=1, initial_replicas=1, max_replicas=2, target_ongoing_requests=32.0, metrics_interval_s=0.5,
        look_back_period_s=3, upscale_delay_s=0.0, downscale_delay_s=0.0,
        policy=dict(policy_function="cluster.autoscaling:PoolAutoscaler", policy_kwargs=asdict(targets)))


def test_the_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "tandem"
