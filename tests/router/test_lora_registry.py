"""The LoRA adapters a cluster serves, as every ingress replica sees them (router/lora_registry.py), over a real
redis-server: what one replica loads or unloads, another serves or stops serving once it reads the registry, and
each load of a name gets a key no load had before."""

import asyncio
import uuid

import pytest

from router.errors import ApiError, Kind
from router.lora_registry import Adapter, LoRARegistry


def test_what_one_replica_loads_and_unloads_the_others_serve_and_stop_serving(redis_url):
    async def run():
        model = f"model-{uuid.uuid4().hex}"  # a cluster of its own in the shared Redis
        one, other = (LoRARegistry(model, ("started",), redis_url) for _ in range(2))
        sql = one.new("sql", "/adapters/sql")
        await one.add(sql, replace=False)
        assert (one.names, other.names) == (("started", "sql"), ("started",))
        await other.read()
        assert other.get("sql") == sql and other.get("sql").key == f"sql@{sql.load_id}"
        assert other.get("started") == Adapter("started") and other.get("started").key == "started"

        with pytest.raises(ApiError, match="The lora adapter 'sql' has already been loaded.") as refused:
            await other.add(other.new("sql", "/adapters/sql-v2"), replace=False)
        assert refused.value.kind is Kind.INVALID_ARGUMENT
        replacement = other.new("sql", "/adapters/sql-v2")
        await other.add(replacement, replace=True)
        await one.read()
        assert one.get("sql") == replacement and replacement.key != sql.key

        chat = other.new("chat", "/adapters/chat")
        await other.add(chat, replace=False)
        await one.read()
        assert one.names == ("started", "sql", "chat")  # in the order of their (last) loads

        await one.remove("sql")
        await other.read()
        assert other.get("sql") is None and other.names == ("started", "chat")
        with pytest.raises(ApiError, match="The lora adapter 'sql' cannot be found.") as missing:
            await other.remove("sql")
        assert missing.value.kind is Kind.NOT_FOUND

    asyncio.run(run())


def test_without_redis_only_the_adapters_started_with_are_served():
    async def run():
        registry = LoRARegistry("model", ("started",), None)
        assert registry.names == ("started",)
        with pytest.raises(ApiError, match="needs its Redis") as refused:
            registry.new("sql", "/adapters/sql")
        assert refused.value.kind is Kind.UNAVAILABLE

    asyncio.run(run())
