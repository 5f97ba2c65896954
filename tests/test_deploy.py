"""What `tandem serve` says when the application fails to deploy: the exception each failed deployment's replicas
raised, from the message Serve keeps for it, rather than Serve's "Failed to update the deployments" alone."""

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview

from cluster.deploy import _reasons

# A decode replica's constructor raised (its worker group's rank refused the adapter); Serve's message holds the
# whole colored traceback. A real failed deploy retries each constructor three times, about a minute on two cores,
# so the status is built here with Serve's own classes and the message as Serve writes it.
TRACEBACK = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor "
             "or initial health check failing. See controller logs for details. Error:\n"
             "\x1b[36mray::ServeReplica:tandem:decode.initialize_and_get_metadata()\x1b[39m (pid=30811)\n"
             '  File "/app/workers/group.py", line 85, in start\n'
             "    ray.get([r.start.remote(address) for r in ranks])\n"
             "ray.exceptions.RayTaskError(LoRAError): \x1b[36mray::RankWorker.start()\x1b[39m (pid=30895)\n"
             '  File "/app/workers/engine/lora.py", line 150, in _shard\n'
             "workers.engine.errors.LoRAError: LoRA adapter 'sql': layer 0 q_proj has A (4, 64) and B (64, 4), "
             "which do not fit this model ((4, 576) and (576, 4)): an adapter of another model?\n")


def deployment(status: DeploymentStatus, message: str) -> DeploymentStatusOverview:
    return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
                                    replica_states={}, message=message)


def test_a_failed_deploy_names_the_exception_of_each_deployment_that_failed():
    app = ApplicationStatusOverview(
        status=ApplicationStatus.DEPLOY_FAILED, message="Failed to update the deployments ['decode'].",
        last_deployed_time_s=0.0,
        deployments={"decode": deployment(DeploymentStatus.DEPLOY_FAILED, TRACEBACK),
                     "ingress": deployment(DeploymentStatus.HEALTHY, "")})
    assert _reasons(app) == ("\n  decode: workers.engine.errors.LoRAError: LoRA adapter 'sql': layer 0 q_proj has "
                             "A (4, 64) and B (64, 4), which do not fit this model ((4, 576) and (576, 4)): an "
                             "adapter of another model?")
