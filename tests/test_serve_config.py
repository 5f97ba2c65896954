"""The Serve config of a cluster config, as a specification: what `serve deploy` and KubeRay's serveConfigV2 get.

One application, `tandem`, built by cluster.app:app_builder from the whole cluster config as its args, which
Tandem's own loader reads back to the same config; TLS reaches Serve's HTTP proxy; the KubeRay layout pins the
ingress to the head pod and each pool to its worker group. `tandem config render` prints it, and
deploy/serve-config.yaml is its output for the defaults.
"""

import argparse
import io
from contextlib import redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.commands import config as config_command
from cluster.config import ClusterConfig, ConfigError, config_from_mapping, load_config
from cluster.serve_config import REPLICA_CPUS, group_bundles, render_serve_config, render_yaml
from router.api_config import ApiConfig

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "deploy" / "serve-config.yaml"


def render_command(*argv: str) -> str:
    parser = argparse.ArgumentParser()
    config_command.add_arguments(parser)
    out = io.StringIO()
    with redirect_stdout(out):
        assert config_command.run(parser.parse_args(["render", *argv])) == 0
    return out.getvalue()


def tls_config(tmp_path: Path, client_ca: bool = False) -> ClusterConfig:
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text("PEM")
    api = ApiConfig(tls_cert_file=str(tmp_path / "tls.crt"), tls_key_file=str(tmp_path / "tls.key"),
                    tls_client_ca_file=str(tmp_path / "ca.crt") if client_ca else None)
    return ClusterConfig(api=api)


# One application, the cluster config as its args


def test_the_defaults_render_to_one_valid_serve_application():
    rendered = render_serve_config(ClusterConfig())
    ServeDeploySchema.model_validate(rendered)
    assert rendered["http_options"] == {"host": "0.0.0.0", "port": 8000}
    [app] = rendered["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("tandem", "/", "cluster.app:app_builder")
    assert "deployments" not in app and "proxy_location" not in rendered  # Serve's defaults on a plain cluster


def test_the_args_are_the_whole_config_and_read_back_to_it():
    config = load_config(None, {"model": "/models/llama", "device": "cuda", "tensor_parallel_size": 2,
                                "redis_url": "redis://redis:6379/0", "prefill.min_replicas": 1,
                                "prefill.max_replicas": 4, "routing.kv_usage": 10.0, "api.max_tokens": 512})
    args = render_serve_config(config)["applications"][0]["args"]
    assert args == asdict(config)
    assert config_from_mapping(args) == config
    # Plain data only: the args survive a YAML round trip (KubeRay's serveConfigV2 is a YAML string).
    assert yaml.safe_load(yaml.safe_dump(args)) == args


def test_the_http_endpoint_follows_host_and_http_port():
    rendered = render_serve_config(ClusterConfig(host="127.0.0.1", http_port=9000, grpc_port=9001))
    assert rendered["http_options"] == {"host": "127.0.0.1", "port": 9000}
    assert rendered["applications"][0]["args"]["grpc_port"] == 9001


def test_tls_serves_http_with_the_same_certificate(tmp_path):
    config = tls_config(tmp_path, client_ca=True)
    rendered = render_serve_config(config)
    ServeDeploySchema.model_validate(rendered)
    assert rendered["http_options"] == {"host": "0.0.0.0", "port": 8000, "ssl_certfile": config.api.tls_cert_file,
                                        "ssl_keyfile": config.api.tls_key_file}
    # Serve's proxy asks no client certificates: mutual TLS stays gRPC's, in the args.
    assert rendered["applications"][0]["args"]["api"]["tls_client_ca_file"] == config.api.tls_client_ca_file


# The KubeRay layout (the Helm chart's)


def test_kuberay_runs_the_proxy_on_the_head_and_pins_each_deployment():
    config = ClusterConfig(device="cuda", tensor_parallel_size=2, num_cpus_per_rank=2.0)
    rendered = render_serve_config(config, kuberay=True)
    ServeDeploySchema.model_validate(rendered)
    assert rendered["proxy_location"] == "HeadOnly"
    ranks = [{"CPU": 2.0, "GPU": 1}] * 2
    assert rendered["applications"][0]["deployments"] == [
        {"name": "ingress", "ray_actor_options": {"num_cpus": REPLICA_CPUS, "resources": {"tandem_ingress": 1}}},
        {"name": "prefill", "placement_group_bundles": [{"CPU": REPLICA_CPUS, "tandem_prefill": 1}, *ranks]},
        {"name": "decode", "placement_group_bundles": [{"CPU": REPLICA_CPUS, "tandem_decode": 1}, *ranks]},
    ]


def test_kuberay_unified_mode_overrides_no_prefill_deployment_and_cpu_ranks_ask_no_gpu():
    # Serve refuses an override for a deployment the application does not have.
    rendered = render_serve_config(ClusterConfig(disaggregate=False), kuberay=True)
    deployments = rendered["applications"][0]["deployments"]
    assert [d["name"] for d in deployments] == ["ingress", "decode"]
    assert deployments[1]["placement_group_bundles"] == [{"CPU": REPLICA_CPUS, "tandem_decode": 1}, {"CPU": 1.0}]


def test_the_kuberay_overrides_are_the_application_builders_bundles_pinned_to_their_group():
    """Serve replaces cluster/app.py's bundles with the overrides: they may only add the pool's custom resource."""
    config = ClusterConfig(tensor_parallel_size=2, device="cuda")
    for deployment in render_serve_config(config, kuberay=True)["applications"][0]["deployments"][1:]:
        replica, *ranks = deployment["placement_group_bundles"]
        resource = f"tandem_{deployment['name']}"
        assert replica.pop(resource) == 1
        assert [replica, *ranks] == group_bundles(config)


# `tandem config render` and the checked-in file


def test_render_prints_the_yaml_of_the_config_from_file_and_flags(tmp_path):
    path = tmp_path / "tandem.yaml"
    path.write_text("block_size: 32\nprefill:\n  replicas: 2\n")
    text = render_command("--config", str(path), "--prefill-replicas", "3", "--redis-url", "redis://r:6379/0")
    assert text.startswith("# ") and "redis_url is null" not in text
    args = yaml.safe_load(text)["applications"][0]["args"]
    assert (args["block_size"], args["prefill"]["replicas"], args["redis_url"]) == (32, 3, "redis://r:6379/0")


def test_render_kuberay_flag_gives_the_chart_layout():
    text = render_command("--kuberay", "--no-disaggregate")
    assert yaml.safe_load(text) == render_serve_config(ClusterConfig(disaggregate=False), kuberay=True)


def test_render_refuses_a_bad_config_naming_the_field():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        render_command("-tp", "0")


def test_the_header_warns_when_redis_url_is_missing():
    assert "# redis_url is null: set it" in render_yaml(ClusterConfig())
    assert "redis_url is null" not in render_yaml(replace(ClusterConfig(), redis_url="redis://r:6379/0"))


def test_deploy_serve_config_yaml_is_the_render_of_the_defaults():
    assert CHECKED_IN.read_text() == render_yaml(ClusterConfig()), (
        "deploy/serve-config.yaml is stale: regenerate it with `tandem config render > deploy/serve-config.yaml`")
    assert render_command() == CHECKED_IN.read_text()
    ServeDeploySchema.model_validate(yaml.safe_load(CHECKED_IN.read_text()))
