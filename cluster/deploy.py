"""Deploying a cluster config as its Serve config (cluster/serve_config.py), the way `serve deploy` and KubeRay's
serveConfigV2 do, so `tandem serve` on a laptop runs exactly what the Helm chart runs on Kubernetes.

It is also the only way to hand Serve an application-level autoscaling policy: `serve.run` takes deployments'
options but not the application's policy. Serve's own `serve run CONFIG` does the same two steps: start Serve
with the config's HTTP options, then apply the config on the controller.
"""

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.config import ClusterConfig
from cluster.serve_config import APP_NAME, render_serve_config

if TYPE_CHECKING:
    from ray.serve.schema import ApplicationStatusOverview


class DeployError(RuntimeError):
    """The application did not come up: Serve's own message says why."""


def drain(timeout_s: float) -> int:
    """Drains every ingress replica (router/ingress.py Ingress.drain): new requests are refused while those in
    flight finish, for up to `timeout_s`. Returns how many replicas drained. A handle reaches one replica a call,
    so calls go out until each running replica has answered."""
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments["ingress"]
    replicas = deployment.replica_states.get("RUNNING", 0)
    handle = serve.get_deployment_handle("ingress", APP_NAME)
    drained: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(drained) < replicas and time.monotonic() < deadline:
        calls = [handle.drain.remote(max(0.0, deadline - time.monotonic())) for _ in range(2 * replicas)]
        drained.update(call.result() for call in calls)
    return len(drained)


def deploy(config: ClusterConfig, timeout_s: float = 900.0, progress: Callable[[str], None] | None = None) -> None:
    """Deploys the application and waits until Serve reports it running (models load, groups start). A first
    start can take minutes (a model converted, weights loaded on every rank): `progress` hears each change of the
    replicas' states, e.g. "prefill: 1 starting; decode: 1 running; ingress: 1 starting"."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(render_serve_config(config))
    serve.start(http_options=schema.http_options.model_dump())
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        app = serve.status().applications.get(APP_NAME)
        if progress is not None and app is not None and app.deployments:
            replicas = _replicas(app)
            if replicas != shown:
                progress(replicas)
                shown = replicas
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployError(f"the application failed to deploy: {app.message}{_reasons(app)}")
        if time.monotonic() > deadline:
            raise DeployError(f"the application is not running after {timeout_s:.0f} s "
                              f"({app.status if app else 'not created'}: {app.message if app else ''})")
        time.sleep(0.25)


def _reasons(app: "ApplicationStatusOverview") -> str:
    """What each deployment that failed raised: the last line of the traceback in its message (the exception a
    replica's constructor raised, e.g. a worker group's LoRAError), one line per deployment."""
    reasons = []
    for name, deployment in app.deployments.items():
        lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", deployment.message or "").splitlines() if line.strip()]
        if deployment.status != "HEALTHY" and lines:
            reasons.append(f"\n  {name}: {lines[-1].strip()}")
    return "".join(reasons)


def _replicas(app: "ApplicationStatusOverview") -> str:
    return "; ".join(f"{name}: " + (", ".join(f"{n} {state.lower().replace('_', ' ')}"
                                              for state, n in deployment.replica_states.items()) or "none yet")
                     for name, deployment in app.deployments.items())
