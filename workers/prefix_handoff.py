"""Scaling down without losing a cache: the replica Serve stops hands its unique prefixes to the pool's survivors.

Serve picks which replica goes (not on the head node, then the node with the fewest replicas, newest first) and
has no hook to pick the one holding the fewest unique cached prefixes (ray-project/ray#33056). So Tandem makes
the pick harmless instead. Once Serve has drained the replica, and before its group stops, the replica sends
every prefix that no other live group of its pool holds to a survivor, through its own deployment's handle and
request router, as a one-token prefilled request. The survivor pulls the blocks over a KV channel, exactly as a
decode group pulls a prompt, and caches them. Only each prefix's last block is computed again.

Nothing is handed on when the whole application goes (Serve says it is deleting, or no replica of the pool is
running), and the hand-off stops at its time budget, so a replica always stops within Serve's graceful shutdown
timeout.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from ray import serve

from router.load_view import LoadView
from router.routing_hint import RoutingHint
from workers.engine.sampling_params import SamplingParams
from workers.group import WorkerGroup
from workers.kv.hashing import BlockHash

logger = logging.getLogger(__name__)

HANDOFF_BUDGET_S = 20.0  # inside the pools' graceful_shutdown_timeout_s (cluster/app.py), with room to stop


@dataclass(frozen=True)
class HandoffReport:
    prefixes: int  # unique prefixes found
    handed_off: int  # of those, now cached by a survivor
    tokens: int  # their tokens
    seconds: float


async def hand_off_prefixes(group: WorkerGroup, redis_url: str, group_id: str, role: str,
                            budget_s: float = HANDOFF_BUDGET_S) -> HandoffReport | None:
    """Run by a stopping pool replica (from its `__del__`); None when there is no survivor to hand to."""
    deployment = serve.get_replica_context().replica_id.deployment_id
    if not await asyncio.to_thread(_pool_survives, deployment.app_name, deployment.name):
        return None
    started = time.monotonic()
    prefixes = await group.unique_prefixes(await held_by_others(redis_url, group_id, role))
    handle = serve.get_deployment_handle(deployment.name, deployment.app_name)
    handed_off = tokens = 0
    try:
        async with asyncio.timeout(budget_s):
            for prefix in prefixes:
                params = SamplingParams(max_tokens=1, temperature=0.0, lora=prefix.lora, lora_path=prefix.lora_path)
                try:
                    handoff = await group.prefill(prefix.token_ids, params, f"handoff-{uuid.uuid4().hex}",
                                                  prefix.cache_salt)
                    group.claim(handoff.request_id)
                    hint = RoutingHint(len(prefix.token_ids), handoff.block_hashes)
                    async for _ in handle.options(stream=True).generate_prefilled.remote(handoff, params, group,
                                                                                         routing=hint):
                        pass
                except Exception as e:  # a survivor that is full or failing costs this prefix, not the rest
                    logger.warning("could not hand on a %d-token prefix: %s", len(prefix.token_ids), e)
                    continue
                handed_off += 1
                tokens += len(prefix.token_ids)
    except TimeoutError:
        logger.warning("prefix hand-off stopped at its %.0f s budget", budget_s)
    report = HandoffReport(len(prefixes), handed_off, tokens, time.monotonic() - started)
    logger.info("%s replica %s handed %d of its %d unique prefixes (%d tokens) to the pool in %.1f s", role,
                group_id, report.handed_off, report.prefixes, report.tokens, report.seconds)
    return report


async def held_by_others(redis_url: str, group_id: str, role: str) -> set[BlockHash]:
    """Every block hash that another live group of the same role holds, from the groups' sets in Redis."""
    view = LoadView(redis_url)
    try:
        reports = await view.reports()
        return await view.blocks_held_by([g for g, report in reports.items()
                                          if g != group_id and report.get("role") == role])
    finally:
        await view.close()


def _pool_survives(app_name: str, deployment_name: str) -> bool:
    """Whether this replica stops alone (a scale-down or a replacement) rather than with its application."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception as e:  # Serve's controller is going away too
        logger.info("no prefix hand-off: Serve's status is unavailable (%s)", e)
        return False
    if app is None or app.status == "DELETING" or deployment_name not in app.deployments:
        return False
    return app.deployments[deployment_name].replica_states.get("RUNNING", 0) > 0
