"""What the API says of the errors a request's path can raise (router/errors.py)."""

import asyncio

import pytest
import ray
import redis.asyncio

from router.errors import Kind, classify
from router.lora_registry import LoRARegistry
from workers.engine.errors import InvalidRequestError, LoRAError


@ray.remote
def _load_adapter() -> None:
    raise LoRAError("LoRA adapter 'sql@3': cannot read /adapters/sql/adapter_config.json: No such file or directory")


def test_an_adapter_a_group_cannot_read_is_an_internal_error_with_the_groups_reason(ray_cluster):
    """Raised in a worker group, the error arrives wrapped in Ray's traceback; the message is the group's own."""
    with pytest.raises(LoRAError) as raised:
        ray.get(_load_adapter.remote())
    error = classify(raised.value)
    assert (error.kind, error.field) == (Kind.INTERNAL, "model")
    assert error.message == ("a worker group could not load the adapter: LoRA adapter 'sql@3': cannot read "
                             "/adapters/sql/adapter_config.json: No such file or directory")


def test_bad_input_names_its_field():
    error = classify(InvalidRequestError("max_tokens", "must be at least 1, got 0"))
    assert (error.kind, error.field, error.message) == (Kind.INVALID_ARGUMENT, "max_tokens",
                                                        "max_tokens: must be at least 1, got 0")


def test_a_redis_that_does_not_answer_makes_the_cluster_unavailable_not_broken():
    """Loading an adapter while the cluster runs records it in Redis: with Redis gone, the caller may retry."""
    async def load() -> None:
        registry = LoRARegistry("model", (), "redis://127.0.0.1:1")  # nothing listens there
        await registry.add(registry.new("sql", "/adapters/sql"), replace=False)

    with pytest.raises(redis.RedisError) as raised:
        asyncio.run(load())
    error = classify(raised.value)
    assert error.kind is Kind.UNAVAILABLE and error.message.startswith("the cluster's Redis did not answer; retry")
