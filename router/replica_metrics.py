"""Each ingress replica's request counts in Redis, so that a scrape of /metrics counts every replica's requests.

Serve's proxy sends each scrape to one ingress replica, and each replica counts only the requests it served: with
two replicas, consecutive scrapes would read two different counters under one name, which Prometheus takes for
resets (rates then jump). So every replica writes its samples to Redis every `period_s` (a key that expires after
a few periods), and the replica that answers a scrape adds the others' last samples to its own live ones. The sum
stays monotonic from scrape to scrape as long as scrapes are further apart than `period_s`.

A replica Serve stops moves its counters and histograms, as they end, into a retired sum that every scrape adds,
in the same Redis script that takes it out of the live ones: a scrape sees its counts once, either way, and scaling
the ingress down reads as no reset (Prometheus would take the drop for one and count the rest again as new). Only
a replica that dies without stopping takes its counts out of the sum as its key expires: one counter reset.
"""

import asyncio
import contextlib
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
# KEYS: the replica set, the retired hash; ARGV: the live keys' prefix, the reader's own id. The other live
# replicas' samples and the retired sum, read at one instant; a replica whose key has expired leaves the set.
_READ = """
local others, gone = {}, {}
for _, replica in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if replica ~= ARGV[2] then
    local value = redis.call('GET', ARGV[1] .. replica)
    if value then table.insert(others, value) else table.insert(gone, replica) end
  end
end
for _, replica in ipairs(gone) do redis.call('SREM', KEYS[1], replica) end
return {others, redis.call('HGETALL', KEYS[2])}
"""
# KEYS: the replica set, the retired hash, the stopping replica's key; ARGV: its id, then field, value pairs.
_RETIRE = """
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"""
# (family, sample name, labels, value) of each sample: what one replica contributes to a scrape.
Samples = list[tuple[str, str, dict[str, str], float]]


class ReplicaMetrics:
    def __init__(self, redis_url: str, namespace: str = DEFAULT_NAMESPACE, period_s: float = 2.0):
        self.replica = uuid.uuid4().hex[:12]
        self.period_s = period_s
        self._replicas = f"{{{namespace}}}:ingress-replicas"
        self._prefix = f"{{{namespace}}}:ingress-metrics:"
        self._retired = f"{{{namespace}}}:ingress-retired"
        self._redis = connect(redis_url, _TIMEOUT_S)
        self._read = self._redis.register_script(_READ)
        self._retire = self._redis.register_script(_RETIRE)
        self._writer: asyncio.Task | None = None
        self._outage = OutageLog(logger, "shared request metrics", "/metrics counts this replica's requests alone")

    def start(self, samples: Callable[[], Samples]) -> None:
        """Writes `samples()` every period from now on, on the running event loop."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_every_period(samples))

    async def stop(self, counts: Samples) -> None:
        """Serve is stopping the replica: `counts`, its counters and histograms as they end, move into the retired
        sum, and its live samples (its gauges too) leave, at one instant."""
        if self._writer is not None:
            # Waited for, so that a write it has sent reaches Redis before the retirement, not after it.
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        fields = [item for family, name, labels, value in counts
                  for item in (json.dumps([family, name, labels], sort_keys=True), value)]
        try:
            await self._retire(keys=[self._replicas, self._retired, self._prefix + self.replica],
                               args=[self.replica, *fields])
        except redis.RedisError as e:
            self._outage.failed(e)  # the key expires by itself, and its counts leave the sum

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
        """The other live replicas' last samples and the stopped ones' retired counts; none while Redis does not
        answer."""
        try:
            values, retired = await self._read(keys=[self._replicas, self._retired], args=[self._prefix, self.replica])
            self._outage.answered()
        except redis.RedisError as e:
            self._outage.failed(e)
            return []
        return [samples for value in values if (samples := _parse(value)) is not None] + [_parse_retired(retired)]


def _parse_retired(flat: list[bytes]) -> Samples:
    """The retired hash's field, value pairs as samples; a field that is not one is left out."""
    samples = []
    for field, value in zip(flat[::2], flat[1::2]):
        try:
            family, name, labels = json.loads(field)
            samples.append((str(family), str(name), {str(k): str(v) for k, v in labels.items()}, float(value)))
        except (ValueError, TypeError, AttributeError) as e:
            logger.warning("ignoring a retired ingress replica's metric: %s: %s", type(e).__name__, e)
    return samples


def _parse(value: bytes) -> Samples | None:
    """Another replica's samples, or None for anything that is not a list of them."""
    try:
        samples: Any = json.loads(value)
        return [(str(family), str(name), {str(k): str(v) for k, v in labels.items()}, float(number))
                for family, name, labels, number in samples]
    except (ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring another ingress replica's metrics: %s: %s", type(e).__name__, e)
        return None
