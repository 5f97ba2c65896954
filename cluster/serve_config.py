"""The Ray Serve config of a cluster config: what `serve deploy` and KubeRay's `serveConfigV2` take.

One application, `tandem`, at route prefix "/", built by `cluster.app:app_builder` from its `args`: the whole
cluster config as nested plain data with deploy/tandem.yaml's keys. When a pool autoscales, the application's
`autoscaling_policy` is cluster/autoscaling.py's, with the config's `autoscaling:` targets as its arguments (Serve
takes an application-level policy only from a config like this one, not from `serve.run`). `http_options` carry
the HTTP endpoint (host, http_port) and, when api.tls_cert_file is set, the same certificate and key, so both
endpoints speak TLS; Serve's HTTP proxy does not ask clients for certificates, so mutual TLS
(api.tls_client_ca_file) covers gRPC only.

    tandem config render --config deploy/tandem.yaml --redis-url redis://redis:6379/0 > serve.yaml
    serve deploy serve.yaml

`kuberay=True` adds what Serve cannot guess on the multi-node cluster the Helm chart (helm/tandem) deploys:
- Serve's HTTP proxy runs on the head pod only (`proxy_location: HeadOnly`), where the ingress replicas are, so one
  Kubernetes Service on the head pod serves both endpoints;
- the ingress replicas are pinned to the head pod, which advertises the custom resource `tandem_ingress`: each
  replica listens for gRPC on grpc_port there (SO_REUSEPORT lets several replicas share the port);
- each pool's replicas are pinned to their own worker group, which advertises `tandem_<pool>` (one unit per TP
  group a pod holds): the first bundle of a replica's placement group asks for one unit, so a pool gets the nodes,
  GPUs and tolerations of its own worker group, and the Ray autoscaler grows the group whose pool is short.
The chart's templates (helm/tandem/templates/_serve.tpl) build the same dict; tests/helm/test_chart.py checks it.
"""

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import yaml

from cluster.autoscaling import AUTOSCALING_POLICY
from cluster.config import ClusterConfig

APP_NAME = "tandem"
IMPORT_PATH = "cluster.app:app_builder"
# A replica only forwards requests to its group's rank 0; the ranks do the work.
REPLICA_CPUS = 0.1
INGRESS_RESOURCE = "tandem_ingress"


def group_bundles(config: ClusterConfig) -> list[dict[str, float]]:
    """A pool replica's placement group: one small bundle for the replica, one per rank (a GPU each on GPU).
    Defined here, without torch, for both cluster/app.py and the KubeRay overrides below."""
    rank = {"CPU": config.num_cpus_per_rank, **({"GPU": 1} if config.device == "cuda" else {})}
    return [{"CPU": REPLICA_CPUS}] + [dict(rank) for _ in range(config.tensor_parallel_size)]


def autoscales(config: ClusterConfig) -> bool:
    """Whether any deployed pool has min/max replicas, and so the application needs the autoscaling policy."""
    pools = [config.ingress, config.decode] + ([config.prefill] if config.disaggregate else [])
    return any(pool.min_replicas is not None for pool in pools)


def pool_resource(pool: str) -> str:
    """The custom resource a worker group's pods advertise, one unit per TP group of `pool` they can hold."""
    return f"tandem_{pool}"


def render_serve_config(config: ClusterConfig, *, kuberay: bool = False) -> dict[str, Any]:
    """A `ray.serve.schema.ServeDeploySchema`-valid dict that deploys `config` (see the module doc for `kuberay`)."""
    http_options: dict[str, Any] = {"host": config.host, "port": config.http_port}
    if config.api.tls_cert_file is not None:
        http_options.update(ssl_certfile=config.api.tls_cert_file, ssl_keyfile=config.api.tls_key_file)
    application: dict[str, Any] = {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                                   "args": asdict(config)}
    if autoscales(config):
        application["autoscaling_policy"] = {"policy_function": AUTOSCALING_POLICY,
                                             "policy_kwargs": asdict(config.autoscaling)}
    serve_config: dict[str, Any] = {"http_options": http_options, "applications": [application]}
    if kuberay:
        serve_config = {"proxy_location": "HeadOnly", **serve_config}
        application["deployments"] = _pinned_deployments(config)
    return serve_config


def _pinned_deployments(config: ClusterConfig) -> list[dict[str, Any]]:
    """Deployment overrides that pin the ingress to the head pod and each pool to its worker group.

    Serve replaces a deployment's ray_actor_options and placement_group_bundles with the config's, so these are
    cluster/app.py's (the same group_bundles) with the custom resource added to the replica's bundle."""
    pools = (["prefill"] if config.disaggregate else []) + ["decode"]
    ingress = {"name": "ingress",
               "ray_actor_options": {"num_cpus": REPLICA_CPUS, "resources": {INGRESS_RESOURCE: 1}}}
    pinned = []
    for pool in pools:
        replica, *ranks = group_bundles(config)
        pinned.append({"name": pool, "placement_group_bundles": [{**replica, pool_resource(pool): 1}, *ranks]})
    return [ingress] + pinned


def render_yaml(config: ClusterConfig, *, kuberay: bool = False) -> str:
    """The Serve config as YAML, headed by a comment that says where it comes from (deploy/serve-config.yaml is
    `tandem config render` of the defaults)."""
    header = ["# Ray Serve config of a Tandem cluster, generated by `tandem config render` (cluster/serve_config.py);",
              "# edit the cluster config (deploy/tandem.yaml documents every key) and render again rather than this.",
              "# Deploy it on a running Ray cluster with `serve deploy FILE`; `args` is the cluster config."]
    if config.redis_url is None:
        header.append("# redis_url is null: set it (--redis-url redis://HOST:6379/0) before deploying; the "
                      "application needs a Redis.")
    return "\n".join(header) + "\n" + _dump(render_serve_config(config, kuberay=kuberay))


def _dump(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)
