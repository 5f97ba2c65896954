"""The request router as Serve ships it. Serve sends a router class to the replicas by value (cloudpickle of its
whole module), so on a replica the router's module-level names are copies, not the classes the ingress imports
there. Whatever the ingress passes must still be recognized by that copy: a hint it failed to recognize would make
it fall back to Serve's default choice without a word."""

import subprocess
import sys
from pathlib import Path

from ray.serve.config import RequestRouterConfig

from router.request_router import PrefixCacheRouter

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
