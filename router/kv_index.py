"""The router's KV-block index: which groups hold which block hashes, kept equal to what the groups report.

`KVIndex` is the pure data structure the routing policy reads; `KVIndexFollower` keeps one filled from Redis
(layout in workers/kv_events.py). On start it reads every group's set and the event stream's last id in one script,
so the snapshot is exact at that id and the index is warm at once; then it tails the stream from that id. Each
group's events carry consecutive sequence numbers, so any break in them (the stream trimmed past a router that fell
behind, an event delivered twice, a Redis that lost its data) is noticed and answered with a fresh snapshot: no
event is missed or applied twice. Routers share nothing but Redis, so any number of them, restarted at any time,
see the same view.
"""

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

import redis

from router.redis_client import OutageLog, connect
from workers.kv.hashing import BlockHash
from workers.kv_events import DEFAULT_NAMESPACE, RETIRE_LUA, KVEvent, KVKeys, decode_entry

logger = logging.getLogger(__name__)

_READ_COUNT = 1000

# KEYS: events, groups, seq. ARGV: blocks key prefix. Returns {last stream id, group, seq, {hashes}, group, ...}.
_SNAPSHOT_LUA = """
local position = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then position = last[1][1] end
local out = {position}
for _, group in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  table.insert(out, group)
  table.insert(out, redis.call('HGET', KEYS[3], group) or '0')
  table.insert(out, redis.call('SMEMBERS', ARGV[1] .. group))
end
return out
"""


class KVIndex:
    """Block hash -> the groups holding it, and group -> its hashes (so a group is dropped in O(its blocks)).

    An entry exists only while some group holds the hash, so memory follows the groups' caches, not history.
    """

    def __init__(self) -> None:
        self._holders: dict[BlockHash, set[str]] = {}
        self._blocks: dict[str, set[BlockHash]] = {}

    def __len__(self) -> int:
        """The number of distinct block hashes held by any group."""
        return len(self._holders)

    def apply(self, event: KVEvent) -> None:
        if event.kind == "stored":
            self.add(event.group_id, event.block_hashes)
        elif event.kind == "removed":
            self.remove(event.group_id, event.block_hashes)
        else:
            self.drop_group(event.group_id)

    def add(self, group_id: str, block_hashes: Iterable[BlockHash]) -> None:
        held = self._blocks.setdefault(group_id, set())
        for block_hash in block_hashes:
            if block_hash not in held:
                held.add(block_hash)
                self._holders.setdefault(block_hash, set()).add(group_id)
        if not held:
            del self._blocks[group_id]

    def remove(self, group_id: str, block_hashes: Iterable[BlockHash]) -> None:
        held = self._blocks.get(group_id)
        if held is None:
            return
        for block_hash in block_hashes:
            if block_hash in held:
                held.remove(block_hash)
                self._unhold(block_hash, group_id)
        if not held:
            del self._blocks[group_id]

    def drop_group(self, group_id: str) -> None:
        for block_hash in self._blocks.pop(group_id, ()):
            self._unhold(block_hash, group_id)

    def clear(self) -> None:
        self._holders.clear()
        self._blocks.clear()

    def groups(self) -> set[str]:
        """The groups holding at least one block."""
        return set(self._blocks)

    def blocks(self, group_id: str) -> frozenset[BlockHash]:
        return frozenset(self._blocks.get(group_id, ()))

    def num_blocks(self, group_id: str) -> int:
        return len(self._blocks.get(group_id, ()))

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """For each group, how many leading blocks of the prompt it holds (its longest cached prefix, in blocks).

        Groups that hold not even the first block are absent. A block only counts after all blocks before it,
        as in the engine, which reuses a prefix and nothing past its first miss.
        """
        matched: dict[str, int] = {}
        candidates: set[str] | None = None
        for depth, block_hash in enumerate(block_hashes, start=1):
            holders = self._holders.get(block_hash)
            if not holders:
                break
            candidates = set(holders) if candidates is None else candidates & holders
            if not candidates:
                break
            for group_id in candidates:
                matched[group_id] = depth
        return matched

    def _unhold(self, block_hash: BlockHash, group_id: str) -> None:
        holders = self._holders[block_hash]
        holders.discard(group_id)
        if not holders:
            del self._holders[block_hash]


class KVIndexFollower:
    """Keeps a `KVIndex` equal to what the live groups hold, from Redis, in a background task.

    It also retires groups whose heartbeat expired (through Redis, so every router drops them on the same
    "cleared" event). Only `redis.asyncio` is used: nothing here blocks the event loop on I/O. While Redis does
    not answer, the index stays as it was and routing goes on with it; once Redis answers, a fresh snapshot
    replaces it (and the groups publish their whole caches again: workers/kv_events.py).
    """

    def __init__(self, redis_url: str, index: KVIndex | None = None, *, namespace: str = DEFAULT_NAMESPACE,
                 block_ms: int = 1000, liveness_interval_s: float = 2.0, retry_s: float = 1.0):
        self.index = index if index is not None else KVIndex()
        self.keys = KVKeys(namespace)
        self.block_ms = block_ms
        self.liveness_interval_s = liveness_interval_s
        self.retry_s = retry_s
        self._redis = connect(redis_url, block_ms / 1000 + 1.0)  # XREAD answers within block_ms
        self._outage = OutageLog(logger, "KV index", "routing with the index as it was")
        self._snapshot = self._redis.register_script(_SNAPSHOT_LUA)
        self._retire = self._redis.register_script(RETIRE_LUA)
        self._position = b"0-0"  # the last stream entry reflected in the index
        self._seqs: dict[str, int] = {}  # group -> seq of its last applied event; absent means 0
        self._stale = False  # the index may have missed events: take a fresh snapshot before reading on
        self._running = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the snapshot (the index is warm when this returns, if Redis answered), then follow the stream in
        the background."""
        try:
            await self._resync()
        except redis.RedisError as e:
            self._outage.failed(e)
            self._stale = True
        self._running = True
        self._task = asyncio.create_task(self._follow(), name="kv-index-follower")

    async def stop(self) -> None:
        """Stop following within block_ms. The loop is asked to stop rather than cancelled: cancelling redis-py
        inside a blocking XREAD can swallow the cancellation and hang (redis/redis-py#2028, #2579)."""
        self._running = False
        if self._task is not None:
            await self._task
            self._task = None
        await self._redis.aclose()

    async def wait_caught_up(self, timeout_s: float = 5.0) -> None:
        """Wait until the index reflects every event in the stream when this is called (TimeoutError if not)."""
        last = await self._redis.xrevrange(self.keys.events, count=1)
        target = _entry_id(last[0][0]) if last else (0, 0)
        deadline = time.monotonic() + timeout_s
        while self._stale or _entry_id(self._position) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"KV index at {self._position!r}, stream at {target}")
            await asyncio.sleep(0.01)

    async def _follow(self) -> None:
        next_check = time.monotonic() + self.liveness_interval_s
        while self._running:
            try:
                if self._stale:
                    await self._resync()
                reply = await self._redis.xread({self.keys.events: self._position}, count=_READ_COUNT,
                                                block=self.block_ms)
                for _, entries in reply:
                    for entry_id, fields in entries:
                        if not self._apply(entry_id, fields):
                            self._stale = True
                            break
                if time.monotonic() >= next_check:
                    await self._retire_dead_groups()
                    next_check = time.monotonic() + self.liveness_interval_s
                self._outage.answered()
            except redis.RedisError as e:
                self._outage.failed(e)
                self._stale = True
                await asyncio.sleep(self.retry_s)

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes]) -> bool:
        """Apply one stream entry if it is its group's next event; False, applying nothing, if it is not.

        A later seq means events were missed; an earlier one, an event delivered twice or counters that restarted
        with a Redis that lost its data. Either way the index can no longer be trusted, so the caller reloads it.
        """
        try:
            seq, event = decode_entry(fields)
        except ValueError as e:  # not written by a group's publisher: skip it, and keep following
            logger.warning("KV index: skipping stream entry %r: %s", entry_id, e)
            self._position = entry_id
            return True
        group_id = event.group_id
        if event.kind == "cleared":
            self.index.drop_group(group_id)
            self._seqs.pop(group_id, None)
        else:
            expected = self._seqs.get(group_id, 0) + 1
            if seq != expected:
                logger.info("KV index: group %s sent seq %d after %d; reloading", group_id, seq, expected - 1)
                return False
            self.index.apply(event)
            self._seqs[group_id] = seq
        self._position = entry_id
        return True

    async def _resync(self) -> None:
        reply = await self._snapshot(keys=[self.keys.events, self.keys.groups, self.keys.seq],
                                     args=[self.keys.blocks_prefix])
        # Everything below runs without an await, so no reader ever sees a half-loaded index.
        self.index.clear()
        self._seqs.clear()
        groups = reply[1:]
        for group, seq, hashes in zip(groups[0::3], groups[1::3], groups[2::3]):
            group_id = group.decode()
            self.index.add(group_id, hashes)
            if int(seq):
                self._seqs[group_id] = int(seq)
        self._position = reply[0]
        self._stale = False

    async def _retire_dead_groups(self) -> None:
        groups = [g.decode() for g in await self._redis.smembers(self.keys.groups)]
        if not groups:
            return
        pipe = self._redis.pipeline(transaction=False)
        for group_id in groups:
            pipe.exists(self.keys.alive(group_id))
        alive = await pipe.execute()
        for group_id, is_alive in zip(groups, alive):
            if not is_alive and await self._retire(keys=self.keys.retire_keys(group_id), args=[group_id, time.time()]):
                logger.info("KV index: group %s stopped its heartbeat; retired it", group_id)


def _entry_id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)
