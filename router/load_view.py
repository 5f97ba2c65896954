"""The groups' loads as they report them through Redis (workers/kv_events.py), for the ingress's decision of who
prefills. Groups refresh their report every second, so it is read at most once a second, by one request while the
others use the last read. While Redis does not answer there are no loads: the ingress then leaves the choice of
groups to the pools' request routers, which know each replica's load from Serve."""

import json
import logging
import time

import redis

from router.policy import GroupLoad
from router.redis_client import OutageLog, connect
from workers.kv.hashing import BlockHash
from workers.kv_events import DEFAULT_NAMESPACE, KVKeys

logger = logging.getLogger(__name__)

_TIMEOUT_S = 0.5  # a read is two small commands: a Redis slower than this counts as down for a second


class LoadView:
    def __init__(self, redis_url: str, namespace: str = DEFAULT_NAMESPACE, max_age_s: float = 1.0):
        self.keys = KVKeys(namespace)
        self.max_age_s = max_age_s
        self._redis = connect(redis_url, _TIMEOUT_S)
        self._loads: dict[str, list[GroupLoad]] = {}
        self._read_at = float("-inf")
        self._outage = OutageLog(logger, "load reports", "routing by the pools' request routers alone")

    async def loads(self) -> dict[str, list[GroupLoad]]:
        """Live groups' loads by role ("prefill", "decode"); a group whose report expired is absent. A group's
        sequences are all it holds work for (EngineStats.num_busy_seqs), as its replica reports them to Serve's
        router; a report from before that count only has the running ones."""
        if time.monotonic() - self._read_at < self.max_age_s:
            return self._loads
        self._read_at = time.monotonic()
        try:
            reports = await self.reports()
        except redis.RedisError as e:
            self._outage.failed(e)
            self._loads = {}
            return self._loads
        self._outage.answered()
        loads: dict[str, list[GroupLoad]] = {}
        for group, load in reports.items():
            try:
                loads.setdefault(load["role"], []).append(GroupLoad(
                    group, free_blocks=load["free_blocks"], total_blocks=load["total_blocks"],
                    queued_prefill_tokens=load["queued_prefill_tokens"],
                    running_seqs=load.get("busy_seqs", load["running_seqs"])))
            except (KeyError, TypeError, ValueError) as e:
                logger.warning("ignoring the load report of %s: %s: %s", group, type(e).__name__, e)
        self._loads = loads
        return loads

    async def reports(self) -> dict[str, dict]:
        """Every live group's last report as it wrote it (group id -> the JSON's dict), read now, uncached: the
        metrics endpoint shows one fresh snapshot per scrape. A report that is not a JSON object is left out."""
        groups = sorted(g.decode(errors="replace") for g in await self._redis.smembers(self.keys.groups))
        raw = await self._redis.mget([self.keys.load(g) for g in groups]) if groups else []
        reports = {}
        for group, report in zip(groups, raw):
            try:
                parsed = json.loads(report) if report is not None else None
            except ValueError:  # not JSON, or not UTF-8
                parsed = None
            if isinstance(parsed, dict):
                reports[group] = parsed
            elif report is not None:
                logger.warning("ignoring the load report of %s: not a JSON object", group)
        return reports

    async def blocks_held_by(self, groups: list[str]) -> set[BlockHash]:
        """The union of the groups' cached block hashes, as their KV events keep them in Redis."""
        if not groups:
            return set()
        return set(await self._redis.sunion([self.keys.blocks(g) for g in groups]))

    async def close(self) -> None:
        await self._redis.aclose()
