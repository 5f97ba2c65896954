"""The LoRA adapters a cluster serves: those it started with (lora_modules, which every group loads at start) and
those loaded while it runs (POST /v1/load_lora_adapter with api.allow_runtime_lora, as vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING allows, or found in lora_dir by the first request that names them).

An adapter loaded while the cluster runs lives in a Redis hash, so every ingress replica serves the same ones; a
replica reads the hash every second, and at once after a load or unload it made itself. The groups are never
told: a request for such an adapter carries its folder (SamplingParams.lora_path), and a group loads it when a
request first names it there (workers/engine/adapter_cache.py). The folder must be readable at the same path
wherever a group runs (a volume every pod mounts, in Kubernetes).

Groups know an adapter by a key, not by the name clients give: each load of a name gets a key of its own (the name
and a random id), so an adapter unloaded and loaded again from another folder, or replaced in place, can never be
mistaken for the weights it had before, by a group that still holds them or by the KV blocks cached under them;
nor after a Redis that lost its data, since the id is not a count kept there.
"""

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio

from router.errors import ApiError, Kind
from router.redis_client import OutageLog, connect

logger = logging.getLogger(__name__)

_PREFIX = "{tandem:lora}"
_READ_EVERY_S = 1.0
_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Adapter:
    name: str  # what requests give as `model`
    path: str | None = None  # its folder, for an adapter loaded while the cluster runs; None: loaded at start
    load_id: str = ""  # that load's, unique in the cluster
    loaded_at: float = 0.0  # when (time.time()), which orders the adapters' list

    @property
    def key(self) -> str:
        """What groups know it by (SamplingParams.lora)."""
        return self.name if self.path is None else f"{self.name}@{self.load_id}"


class LoRARegistry:
    def __init__(self, model: str, started_with: tuple[str, ...], redis_url: str | None):
        """`model`: the served model's name, which keys the hash (a Redis may hold several clusters' adapters);
        `started_with`: the adapters of lora_modules. Without `redis_url` only those are served."""
        self.started_with = {name: Adapter(name) for name in started_with}
        self._redis = connect(redis_url, _TIMEOUT_S) if redis_url else None
        self._outage = OutageLog(logger, "LoRA adapters loaded at run time", "serving those read last")
        self._hash = f"{_PREFIX}:adapters:{model}"
        self._loaded: dict[str, Adapter] = {}
        self._reader: asyncio.Task | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter's name: those started with, then those loaded since, in the order they were loaded."""
        return *self.started_with, *self._loaded

    def get(self, name: str) -> Adapter | None:
        """The adapter of that name as of the last read of the hash."""
        return self.started_with.get(name) or self._loaded.get(name)

    def follow(self) -> None:
        """Reads the hash every second from now on, on the running event loop."""
        if self._redis is not None and self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_every_second())

    async def _read_every_second(self) -> None:
        while True:
            try:
                await self.read()
                self._outage.answered()
            except redis.RedisError as e:  # keep serving what was read last; Redis may come back
                self._outage.failed(e)
            await asyncio.sleep(_READ_EVERY_S)

    async def read(self) -> None:
        loaded = []
        for name, value in (await self._store().hgetall(self._hash)).items():
            try:
                entry = json.loads(value)
                loaded.append(Adapter(name.decode(), str(entry["path"]), str(entry["id"]), float(entry["at"])))
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring LoRA adapter entry %r: %s: %s", name, type(e).__name__, e)
        self._loaded = {adapter.name: adapter for adapter in sorted(loaded, key=lambda adapter: adapter.loaded_at)}

    def new(self, name: str, path: str) -> Adapter:
        """The adapter under a key no load of any adapter had before, not recorded yet."""
        self._store()
        return Adapter(name, path, uuid.uuid4().hex[:12], time.time())

    async def add(self, adapter: Adapter, replace: bool) -> None:
        """Records the load; without `replace`, a name loaded already (by any replica) is refused."""
        value = json.dumps({"path": adapter.path, "id": adapter.load_id, "at": adapter.loaded_at})
        if replace:
            await self._store().hset(self._hash, adapter.name, value)
        elif not await self._store().hsetnx(self._hash, adapter.name, value):
            raise ApiError(Kind.INVALID_ARGUMENT, f"The lora adapter '{adapter.name}' has already been loaded.",
                           "lora_name")
        await self.read()

    async def remove(self, name: str) -> None:
        if not await self._store().hdel(self._hash, name):
            raise ApiError(Kind.NOT_FOUND, f"The lora adapter '{name}' cannot be found.", "lora_name")
        await self.read()

    def _store(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise ApiError(Kind.UNAVAILABLE, "loading LoRA adapters while the cluster runs needs its Redis")
        return self._redis
