"""The Serve application: an ingress in front of a prefill pool and a decode pool (or only a decode pool in
unified mode), built from one ClusterConfig.

Each pool replica is one worker group. Its placement group has one small bundle for the replica itself and one
per rank (a GPU each on GPU), packed on one node, so Serve reserves, starts, health-checks, autoscales and stops
a group as one unit.
"""

from ray import serve
from ray.serve import Application

from cluster.config import ClusterConfig, cache_dir
from router.ingress import Ingress
from workers.engine.model_store import resolve_model
from workers.server import EngineServer

# A replica only forwards requests to its group's rank 0; the ranks do the work.
REPLICA_CPUS = 0.1


def required_cpus(config: ClusterConfig) -> float:
    """Logical CPUs the application reserves, for sizing a local Ray."""
    group = REPLICA_CPUS + config.tensor_parallel_size * config.num_cpus_per_rank
    pools = [config.decode] + ([config.prefill] if config.disaggregate else [])
    return REPLICA_CPUS * config.ingress.replicas + group * sum(p.max_replicas or p.replicas for p in pools)


def build_app(config: ClusterConfig) -> Application:
    model_dir = str(resolve_model(config.model, cache_dir()))  # converted once here, not on every rank
    engine = config.to_engine_config(model_dir)
    tp = config.tensor_parallel_size
    rank = {"CPU": config.num_cpus_per_rank, **({"GPU": 1} if config.device == "cuda" else {})}

    def pool(name: str, pool_config) -> Application:
        return serve.deployment(EngineServer, name=name).options(
            **pool_config.serve_options(),
            ray_actor_options={"num_cpus": REPLICA_CPUS},
            placement_group_bundles=[{"CPU": REPLICA_CPUS}] + [rank] * tp,
            placement_group_strategy="STRICT_PACK",
            health_check_period_s=10, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=30,
        ).bind(engine, tp, config.num_cpus_per_rank, name)

    prefill = pool("prefill", config.prefill) if config.disaggregate else None
    decode = pool("decode", config.decode)
    return serve.deployment(Ingress, name="ingress").options(
        **config.ingress.serve_options(), ray_actor_options={"num_cpus": REPLICA_CPUS},
    ).bind(prefill, decode, model_dir)
