"""The Serve application: an ingress in front of a prefill pool and a decode pool (or only a decode pool in
unified mode), built from one ClusterConfig.

Each pool replica is one worker group. Its placement group has one small bundle for the replica itself and one
per rank (a GPU each on GPU), packed on one node, so Serve reserves, starts, health-checks, autoscales and stops
a group as one unit.
"""

from dataclasses import asdict
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig, cache_dir, config_from_mapping
from cluster.serve_config import REPLICA_CPUS, group_bundles
from router.baselines import PrefixTreeRouter, RoundRobinRouter, SGLangCacheAwareRouter
from router.ingress import Ingress, ServedModel
from router.request_router import PrefixCacheRouter
from router.routing_hint import ROUTING_STATS_PERIOD_S
from workers.engine.classification import classes_of
from workers.engine.model_runner import load_hf_config
from workers.engine.model_store import resolve_model
from workers.engine.sampling_params import generation_config_defaults
from workers.server import EngineServer

# How often a stopping replica checks whether its requests are done (Serve's default is 2 s). Deleting the app
# (Ctrl-C, `serve.delete`) stops the ingress before the pools, so it waits two such periods at the least, and a
# scale-down one; the routers hear of a stopping replica within milliseconds, well inside a period.
SHUTDOWN_POLL_S = 0.5

# The prefill routers Tandem's is compared against (tandem bench routing), as RequestRouterConfig arguments.
BASELINE_ROUTERS = {
    "round-robin": dict(request_router_class=RoundRobinRouter),
    "power-of-two": dict(),  # Serve's default
    "prefix-tree": dict(request_router_class=PrefixTreeRouter),
    "sglang": dict(request_router_class=SGLangCacheAwareRouter),
}


def required_cpus(config: ClusterConfig) -> float:
    """Logical CPUs the application reserves, for sizing a local Ray."""
    group = REPLICA_CPUS + config.tensor_parallel_size * config.num_cpus_per_rank
    pools = [config.decode] + ([config.prefill] if config.disaggregate else [])
    return REPLICA_CPUS * config.ingress.replicas + group * sum(p.max_replicas or p.replicas for p in pools)


def app_builder(args: dict) -> Application:
    """The application for `serve run` / `serve deploy` / KubeRay (import path `cluster.app:app_builder`): its
    `args` are the cluster config, with the keys of deploy/tandem.yaml."""
    return build_app(config_from_mapping(args))


def build_app(config: ClusterConfig) -> Application:
    """`config.redis_url` must be set: the groups publish KV events there and the prefill router reads them."""
    if config.redis_url is None:
        raise ValueError("build_app needs config.redis_url (tandem serve starts a local redis-server for it)")
    model_dir = str(resolve_model(config.model, cache_dir()))  # converted once here, not on every rank
    engine = config.to_engine_config(model_dir)
    tp = config.tensor_parallel_size

    def pool(name: str, pool_config, **options) -> Application:
        return serve.deployment(EngineServer, name=name).options(
            **pool_config.serve_options(config.autoscaling), **options,
            ray_actor_options={"num_cpus": REPLICA_CPUS},
            placement_group_bundles=group_bundles(config),
            placement_group_strategy="STRICT_PACK",
            health_check_period_s=10, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=60, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        ).bind(engine, tp, config.num_cpus_per_rank, name, config.redis_url, config.step_timeout_s)

    def router(role: str) -> RequestRouterConfig:
        return RequestRouterConfig(
            request_router_class=PrefixCacheRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_router_kwargs=dict(redis_url=config.redis_url, role=role, block_size=config.block_size,
                                       weights=asdict(config.routing)))

    prefill_router = router("prefill") if config.prefill_router == "prefix-cache" else \
        RequestRouterConfig(**BASELINE_ROUTERS[config.prefill_router])
    prefill = pool("prefill", config.prefill, request_router_config=prefill_router) if config.disaggregate else None
    decode = pool("decode", config.decode, request_router_config=router("decode"))
    # The ingress's own decision (who prefills) is part of Tandem's routing; the baselines route without it.
    decides = config.prefill_router == "prefix-cache" and config.conditional_disaggregation
    # The ingress serves HTTP through Serve's proxy (serve.ingress) and gRPC on its own port.
    return serve.deployment(serve.ingress()(Ingress), name="ingress").options(
        **config.ingress.serve_options(), ray_actor_options={"num_cpus": REPLICA_CPUS},
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
    ).bind(prefill, decode, served_model(config, model_dir), config.api, config.redis_url, asdict(config.routing),
           config.host, config.grpc_port, decides)


def served_model(config: ClusterConfig, model_dir: str) -> ServedModel:
    """The model as clients name it: served_model_name, else the configured name ('smollm2') or the folder's
    name, not a local path."""
    hf_config = load_hf_config(model_dir)
    max_len = min(config.max_model_len or hf_config.max_position_embeddings, hf_config.max_position_embeddings)
    return ServedModel(name=config.served_model_name or Path(config.model).name, path=model_dir,
                       max_model_len=max_len, vocab_size=hf_config.vocab_size, block_size=config.block_size,
                       hidden_size=hf_config.hidden_size, classes=classes_of(hf_config),
                       adapters=tuple(config.lora_modules), lora_dir=config.lora_dir,
                       sampling_defaults=generation_config_defaults(model_dir)
                       if config.generation_config == "auto" else {})
