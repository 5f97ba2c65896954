"""Each ingress replica's request counts in Redis, so that a scrape of /metrics counts every replica's requests.

Serve's proxy sends each scrape to one ingress replica, and each replica counts only the requests it served: with
two replicas, consecutive scrapes would read two different counters under one name, which Prometheus takes for
resets (rates then jump). So every replica writes its samples to Redis every `period_s` (a key that expires after
a few periods, so a dead replica's counts leave), and the replica that answers a scrape adds the others' last
samples to its own live ones. The sum stays monotonic from scrape to scrape as long as scrapes are further apart
than `period_s`; when a replica stops, its counts leave the sum once, which Prometheus reads as one counter reset.
"""

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis

from router.redis_client import OutageLog, connect
from workers.kv_events import DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

_TIMEOUT_S = 0.5
# (family, sample name, labels, value) of each sample: what one replica contributes to a scrape.
Samples = list[tuple[str, str, dict[str, str], float]]


class ReplicaMetrics:
    def __init__(self, redis_url: str, namespace: str = DEFAULT_NAMESPACE, period_s: float = 2.0):
        self.replica = uuid.uuid4().hex[:12]
        self.period_s = period_s
        self._replicas = f"{{{namespace}}}:ingress-replicas"
        self._prefix = f"{{{namespace}}}:ingress-metrics:"
        self._redis = connect(redis_url, _TIMEOUT_S)
        self._writer: asyncio.Task | None = None
        self._outage = OutageLog(logger, "shared request metrics", "/metrics counts this replica's requests alone")

    def start(self, samples: Callable[[], Samples]) -> None:
        """Writes `samples()` every period from now on, on the running event loop."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_every_period(samples))

    async def stop(self) -> None:
        """Takes this replica's counts out of the sum at once (Serve is stopping the replica)."""
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        try:
            await self._redis.delete(self._prefix + self.replica)
            await self._redis.srem(self._replicas, self.replica)
        except redis.RedisError as e:
            self._outage.failed(e)  # the key expires by itself

    async def _write_every_period(self, samples: Callable[[], Samples]) -> None:
        while True:
            try:
                await self.write(samples())
                self._outage.answered()
            except redis.RedisError as e:
                self._outage.failed(e)
            await asyncio.sleep(self.period_s)

    async def write(self, samples: Samples) -> None:
        await self._redis.set(self._prefix + self.replica, json.dumps(samples), ex=max(10, int(5 * self.period_s)))
        await self._redis.sadd(self._replicas, self.replica)

    async def others(self) -> list[Samples]:
        """The other live replicas' last samples; none while Redis does not answer."""
        try:
            replicas = sorted(r.decode(errors="replace") for r in await self._redis.smembers(self._replicas))
            replicas = [r for r in replicas if r != self.replica]
            values = await self._redis.mget([self._prefix + r for r in replicas]) if replicas else []
            gone = [r for r, value in zip(replicas, values) if value is None]
            if gone:
                await self._redis.srem(self._replicas, *gone)
            self._outage.answered()
        except redis.RedisError as e:
            self._outage.failed(e)
            return []
        return [samples for value in values if value is not None and (samples := _parse(value)) is not None]


def _parse(value: bytes) -> Samples | None:
    """Another replica's samples, or None for anything that is not a list of them."""
    try:
        samples: Any = json.loads(value)
        return [(str(family), str(name), {str(k): str(v) for k, v in labels.items()}, float(number))
                for family, name, labels, number in samples]
    except (ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring another ingress replica's metrics: %s: %s", type(e).__name__, e)
        return None
