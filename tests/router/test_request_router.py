"""The request router as Serve ships it. Serve sends a router class to the replicas by value (cloudpickle of its
whole module), so on a replica the router's module-level names are copies, not the classes the ingress imports
there. Whatever the ingress passes must still be recognized by that copy: a hint it failed to recognize would make
it fall back to Serve's default choice without a word."""

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import ReplicaID

from router.request_router import PrefixCacheRouter
from router.routing_hint import OUT_OF_SERVICE, RoutingHint

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process, as a replica would: the ingress's own import, then the router Serve unpickled.
_REPLICA = """
import sys
from types import SimpleNamespace
from ray import cloudpickle
from router.routing_hint import RoutingHint  # what the ingress imports and sends

shipped = cloudpickle.loads(open(sys.argv[1], "rb").read())
hint = RoutingHint(num_tokens=40, block_hashes=[b"h1", b"h2"])
print(shipped.choose_replicas.__globals__["_hint"](SimpleNamespace(args=(), kwargs={"routing": hint})) == hint)
"""


def test_the_router_serve_ships_recognizes_the_ingress_routing_hint(tmp_path):
    shipped = tmp_path / "router.pkl"
    shipped.write_bytes(RequestRouterConfig(request_router_class=PrefixCacheRouter).get_serialized_request_router_cls())
    out = subprocess.run([sys.executable, "-c", _REPLICA, str(shipped)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_a_group_out_of_service_is_ranked_last_and_offered_only_when_no_other_serves(redis_url):
    """A decode group whose rank died still looks idle (its sequences were failed), which would make it everyone's
    first choice, a moved request's too, until Serve's health check replaces it."""
    router = PrefixCacheRouter(deployment_id=DeploymentID(name="decode"),
                               handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(redis_url=redis_url, role="decode")
    busy = {"free_blocks": 10, "total_blocks": 100, "queued_prefill_tokens": 0, "running_seqs": 40}

    def replica(name: str, stats: dict) -> SimpleNamespace:
        return SimpleNamespace(replica_id=ReplicaID(name, DeploymentID(name="decode")), routing_stats=stats)

    def ranked(*candidates) -> list[list[str]]:
        pending = SimpleNamespace(kwargs={"routing": RoutingHint(40, [])},
                                  metadata=SimpleNamespace(internal_request_id=f"q{len(candidates)}"))
        return [[r.replica_id.unique_id for r in tier]
                for tier in asyncio.run(router.choose_replicas(list(candidates), pending))]

    lost, serving = replica("lost", {OUT_OF_SERVICE: 1.0}), replica("serving", busy)
    assert ranked(lost, serving) == [["serving"], ["lost"]]
    assert ranked(lost) == [["lost"]]
