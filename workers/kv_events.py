"""KV events: each worker group tells Redis which block hashes its prefix cache holds, for the routers' index.

Redis layout, all keys under one hash tag so that a Redis Cluster keeps them on one slot and a script may touch them:

    {ns}:events          one stream for all groups; fields group, kind, seq, hashes (32-byte hashes back to back),
                         parent (empty for none), ts
    {ns}:blocks:<group>  set: the block hashes the group holds now
    {ns}:seq             hash: group -> seq of its last stored/removed event; absent after "cleared"
    {ns}:groups          set: the groups that have state here
    {ns}:alive:<group>   heartbeat with a TTL; when it expires the group is dead and any router retires it

One Lua script applies an event to its group's set and appends it to the stream, so a reader that reads the sets
and the stream's last id in one script holds a snapshot that is exact at that id, and per-group sequence numbers
(restarting after each "cleared") let it prove it missed nothing after. If events are lost (Redis unreachable or
restarted empty, the queue full), the publisher publishes "cleared" and then every block the group holds at that
moment (it keeps that set as the group's events change it), so Redis is whole again as soon as it answers.
"""

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis

from workers.kv.hashing import BlockHash

logger = logging.getLogger(__name__)

KVEventKind = Literal["stored", "removed", "cleared"]

DEFAULT_NAMESPACE = "tandem:kv"
HASH_LEN = 32  # SHA-256 digests (workers/kv/hashing.py)

_MAX_BATCH = 512
_LOAD_INTERVAL_S = 1.0
_SOCKET_TIMEOUT_S = 5.0  # a hung Redis must not hang close()

# KEYS: blocks, seq, events, groups, alive. ARGV: group, kind, hashes, parent, ts, max stream length, ttl ms.
# Returns 1 where the group's state was gone before a stored or removed event (a Redis that restarted empty, or a
# router that retired the group after its heartbeat lapsed), else 0.
_PUBLISH_LUA = """
local lost = 0
if ARGV[2] ~= 'cleared' and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then lost = 1 end
local seq = 0
if ARGV[2] == 'cleared' then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  seq = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  local op = ARGV[2] == 'stored' and 'SADD' or 'SREM'
  for i = 1, #ARGV[3], %d do
    redis.call(op, KEYS[1], string.sub(ARGV[3], i, i + %d))
  end
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SET', KEYS[5], '1', 'PX', ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'group', ARGV[1], 'kind', ARGV[2], 'seq', seq,
           'hashes', ARGV[3], 'parent', ARGV[4], 'ts', ARGV[5])
return lost
""" % (HASH_LEN, HASH_LEN - 1)

# Retires a group whose heartbeat is gone: deletes its state and tells every router with a "cleared" event.
# KEYS: alive, blocks, seq, groups, events. ARGV: group, ts. Returns 1 if it retired the group, 0 if not (alive,
# or another router was first).
RETIRE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'group', ARGV[1], 'kind', 'cleared', 'seq', 0, 'hashes', '', 'parent', '',
           'ts', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class KVEvent:
    """A change to the set of block hashes one group holds."""

    group_id: str
    kind: KVEventKind
    block_hashes: tuple[BlockHash, ...] = ()
    parent_hash: BlockHash | None = None  # the block before block_hashes[0] in its sequence (stored only)
    timestamp: float = 0.0  # wall-clock seconds when the engine made the change


@dataclass(frozen=True)
class KVKeys:
    """The Redis key names of one namespace; several clusters (or tests) can share one Redis."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def events(self) -> str:
        return f"{{{self.namespace}}}:events"

    @property
    def seq(self) -> str:
        return f"{{{self.namespace}}}:seq"

    @property
    def groups(self) -> str:
        return f"{{{self.namespace}}}:groups"

    @property
    def blocks_prefix(self) -> str:
        return f"{{{self.namespace}}}:blocks:"

    def blocks(self, group_id: str) -> str:
        return self.blocks_prefix + group_id

    def alive(self, group_id: str) -> str:
        return f"{{{self.namespace}}}:alive:{group_id}"

    def load(self, group_id: str) -> str:
        """The group's role and load (JSON), refreshed every second, expiring with the heartbeat."""
        return f"{{{self.namespace}}}:load:{group_id}"

    def retire_keys(self, group_id: str) -> list[str]:
        return [self.alive(group_id), self.blocks(group_id), self.seq, self.groups, self.events]


_KINDS = ("stored", "removed", "cleared")


def decode_entry(fields: dict[bytes, bytes]) -> tuple[int, KVEvent]:
    """A stream entry's (seq, event); anything else in the stream (a missing field, an unknown kind, hashes that
    are not whole digests, bytes that are not numbers) is a ValueError, and nothing in it is ever unpickled."""
    try:
        hashes, kind, parent = fields[b"hashes"], fields[b"kind"].decode(), fields[b"parent"]
        event = KVEvent(
            group_id=fields[b"group"].decode(),
            kind=kind,
            block_hashes=tuple(hashes[i:i + HASH_LEN] for i in range(0, len(hashes), HASH_LEN)),
            parent_hash=parent or None,
            timestamp=float(fields[b"ts"]),
        )
        seq = int(fields[b"seq"])
    except (KeyError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not a KV event: {type(e).__name__}: {e}") from None
    if kind not in _KINDS or len(hashes) % HASH_LEN or len(parent) not in (0, HASH_LEN):
        raise ValueError(f"not a KV event: kind {kind!r}, {len(hashes)} bytes of hashes, {len(parent)} of parent")
    return seq, event


@dataclass(frozen=True)
class KVEventsTarget:
    """Where a group publishes its KV events, and the id routers know it by (its Serve replica's id)."""

    redis_url: str
    group_id: str
    role: str  # "prefill" or "decode": the ingress weighs the groups' loads by role


class KVEventPublisher:
    """A `KVEventSink` for one group's block manager that writes to Redis without ever blocking the engine.

    The engine thread only puts events on a bounded queue and keeps the set of blocks they leave the group holding;
    a daemon thread writes them in batches (one pipeline of scripts) and refreshes the group's heartbeat every
    ttl_s / 3.
    """

    def __init__(self, redis_url: str, group_id: str, *, namespace: str = DEFAULT_NAMESPACE, ttl_s: float = 10.0,
                 max_stream_len: int = 100_000, max_queued: int = 10_000, retry_s: float = 1.0):
        self.group_id = group_id
        # Set by the owner once its engine runs: the role ("prefill" or "decode") and a callable returning the
        # group's load, which the publisher then reports beside the events for the ingress's routing decisions.
        self.role: str | None = None
        self.load: Callable[[], dict[str, int]] | None = None
        self.keys = KVKeys(namespace)
        self.ttl_s = ttl_s
        self.max_stream_len = max_stream_len
        self.retry_s = retry_s
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=_SOCKET_TIMEOUT_S,
                                           socket_connect_timeout=_SOCKET_TIMEOUT_S)
        self._publish = self._redis.register_script(_PUBLISH_LUA)
        self._retire = self._redis.register_script(RETIRE_LUA)
        self._queue: queue.Queue[KVEvent | threading.Event] = queue.Queue(max_queued)
        # The blocks the group's events leave it holding, for a resync to publish whole. The lock keeps each event's
        # change to the set and its place in the queue together, against a resync's snapshot of both.
        self._held: set[BlockHash] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # Set when events may have been lost: the thread then publishes the whole cache again (_resync).
        self._dirty = False
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{group_id}", daemon=True)

    # -- the engine thread (KVEventSink) ----------------------------------------------------------------------

    def blocks_stored(self, block_hashes: list[BlockHash], parent_hash: BlockHash | None) -> None:
        with self._lock:
            self._held.update(block_hashes)
            self._put(KVEvent(self.group_id, "stored", tuple(block_hashes), parent_hash, time.time()))

    def blocks_removed(self, block_hashes: list[BlockHash]) -> None:
        with self._lock:
            self._held.difference_update(block_hashes)
            self._put(KVEvent(self.group_id, "removed", tuple(block_hashes), None, time.time()))

    def cache_cleared(self) -> None:
        with self._lock:
            self._held.clear()
            self._put(KVEvent(self.group_id, "cleared", (), None, time.time()))

    def _put(self, event: KVEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._dirty = True

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Announce the group with an empty cache (a restarted group's old blocks are gone) and start writing.

        If Redis cannot be reached now the group starts anyway and the thread retries."""
        try:
            self._write([KVEvent(self.group_id, "cleared", (), None, time.time())])
        except redis.RedisError as e:
            logger.warning("KV events of %s: Redis unreachable at start (%s); retrying in the background",
                           self.group_id, e)
            self._dirty = True
        self._thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until Redis reflects every event reported before this call (after lost events: the "cleared" that
        supersedes them); False if that took longer than timeout_s."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def close(self) -> None:
        """Retire the group: stop writing, then publish "cleared" and delete its state, heartbeat included."""
        self._stopping.set()
        if self._thread.is_alive():
            try:
                self._queue.put_nowait(threading.Event())  # wakes the thread
            except queue.Full:
                pass
            self._thread.join()
        try:
            self._redis.delete(self.keys.alive(self.group_id), self.keys.load(self.group_id))
            self._retire(keys=self.keys.retire_keys(self.group_id), args=[self.group_id, time.time()])
        except redis.RedisError as e:
            logger.warning("KV events of %s: could not retire the group (%s); its heartbeat will expire",
                           self.group_id, e)
        self._redis.close()

    # -- the writer thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.ttl_s / 3
        next_beat = time.monotonic() + interval
        next_load = time.monotonic()
        while not self._stopping.is_set():
            try:
                if self._dirty:
                    self._resync()
                wake = min(next_beat, next_load) if self.load is not None else next_beat
                items = self._take(max(0.0, wake - time.monotonic()))
                self._write([item for item in items if isinstance(item, KVEvent)])
                for item in items:
                    if isinstance(item, threading.Event):
                        item.set()
                if time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + interval
                if self.load is not None and time.monotonic() >= next_load:
                    report = json.dumps({"role": self.role, **self.load()})
                    self._redis.set(self.keys.load(self.group_id), report, px=int(self.ttl_s * 1000))
                    next_load = time.monotonic() + _LOAD_INTERVAL_S
            except redis.RedisError as e:
                logger.warning("KV events of %s: Redis write failed (%s); the group will republish as empty",
                               self.group_id, e)
                self._dirty = True
                self._stopping.wait(self.retry_s)

    def _take(self, timeout_s: float) -> list[KVEvent | threading.Event]:
        try:
            items = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while len(items) < _MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _resync(self) -> None:
        """Publish the group's cache whole again, after events that never reached Redis: "cleared", then every block
        the group holds. The queued events are dropped in the same step as the set is copied, so the set includes
        exactly them, and the events queued after it follow on."""
        self._dirty = False
        waiting: list[threading.Event] = []
        with self._lock:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, threading.Event):
                    waiting.append(item)
            held = list(self._held)
        now = time.time()
        self._write([KVEvent(self.group_id, "cleared", (), None, now)] +
                    [KVEvent(self.group_id, "stored", tuple(held[i:i + _MAX_BATCH]), None, now)
                     for i in range(0, len(held), _MAX_BATCH)])
        for done in waiting:
            done.set()

    def _beat(self) -> None:
        """Refresh the heartbeat; an idle group's state found gone (see _PUBLISH_LUA) is published again."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self.keys.alive(self.group_id), b"1", px=int(self.ttl_s * 1000))
        pipe.sismember(self.keys.groups, self.group_id)
        if not pipe.execute()[1]:
            self._found_lost()

    def _found_lost(self) -> None:
        logger.warning("KV events of %s: its state in Redis is gone (a Redis restarted empty, or the group retired "
                       "after its heartbeat lapsed); publishing its cache again", self.group_id)
        self._dirty = True

    def _write(self, events: list[KVEvent]) -> None:
        if not events:
            return
        keys = [self.keys.blocks(self.group_id), self.keys.seq, self.keys.events, self.keys.groups,
                self.keys.alive(self.group_id)]
        pipe = self._redis.pipeline(transaction=False)
        for e in events:
            args = [e.group_id, e.kind, b"".join(e.block_hashes), e.parent_hash or b"", repr(e.timestamp),
                    self.max_stream_len, int(self.ttl_s * 1000)]
            self._publish(keys=keys, args=args, client=pipe)
        if any(pipe.execute()):
            self._found_lost()
