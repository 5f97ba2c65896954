"""What went wrong with a request, in the API's terms: one classification that the gRPC servicer turns into a
status code and the HTTP API into a status and an OpenAI-style error body, so both say the same thing.

The rule: a client's mistake is never INTERNAL. Bad input names the field; a full cluster says retry later; a
cluster without healthy groups says try elsewhere.
"""

import asyncio
import enum
from dataclasses import dataclass

import grpc
import redis
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from workers.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    KVCacheFullError,
    LoRAError,
    ModelNotFoundError,
    RequestFailedError,
)


class Kind(enum.Enum):
    # (gRPC status, HTTP status, OpenAI error type)
    OK = (grpc.StatusCode.OK, 200, "")
    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404, "not_found_error")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout")
    CANCELLED = (grpc.StatusCode.CANCELLED, 499, "cancelled")
    INTERNAL = (grpc.StatusCode.INTERNAL, 500, "internal_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @property
    def openai_type(self) -> str:
        return self.value[2]


@dataclass
class ApiError(Exception):
    """An error the API reports as is: `field` names the request field at fault, when one is."""

    kind: Kind
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return self.message


def invalid(field: str, message: str) -> ApiError:
    return ApiError(Kind.INVALID_ARGUMENT, f"{field}: {message}", field)


def classify(error: BaseException) -> ApiError:
    """The API's view of any exception a request's path can raise (also across Serve handles, which re-raise a
    replica's exception as a subclass of it)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRequestError):
        # Not str(error): raised in a worker group, that is Ray's traceback; the cause's fields are the message.
        return ApiError(Kind.INVALID_ARGUMENT, f"{error.field}: {error.message}", error.field)
    if isinstance(error, DuplicateRequestError):
        return ApiError(Kind.INVALID_ARGUMENT, f"request_id: {error}", "request_id")
    if isinstance(error, LoRAError):
        # A group could not read an adapter loaded while the cluster runs (a folder its node lacks, or that has
        # changed since): not the caller's mistake, and retrying will not help.
        return ApiError(Kind.INTERNAL, f"a worker group could not load the adapter: {getattr(error, 'cause', error)}",
                        "model")
    if isinstance(error, ModelNotFoundError):
        return ApiError(Kind.NOT_FOUND, str(error), "model")
    if isinstance(error, (BackPressureError, KVCacheFullError)):
        return ApiError(Kind.RESOURCE_EXHAUSTED, f"the cluster is at capacity, retry later ({_first_line(error)})")
    if isinstance(error, (DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError,
                          ActorUnavailableError, RayActorError)):
        return ApiError(Kind.UNAVAILABLE, f"no healthy worker group could take the request ({_first_line(error)})")
    if isinstance(error, redis.RedisError):  # what the cluster keeps there (adapters, stored responses) is out of reach
        return ApiError(Kind.UNAVAILABLE, f"the cluster's Redis did not answer; retry ({_first_line(error)})")
    if isinstance(error, RequestFailedError):
        return ApiError(Kind.UNAVAILABLE, f"the worker group failed while running the request; retry "
                                          f"({_first_line(error)})")
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return ApiError(Kind.DEADLINE_EXCEEDED, "the request's deadline passed; it was aborted")
    if isinstance(error, asyncio.CancelledError):
        return ApiError(Kind.CANCELLED, "the request was cancelled")
    return ApiError(Kind.INTERNAL, f"internal error: {type(error).__name__}: {_first_line(error)}")


def renamed(error: ApiError, aliases: dict[str, str]) -> ApiError:
    """The engine's field name replaced by the API's (prompt_token_ids -> prompt, ...)."""
    if error.field not in aliases:
        return error
    name = aliases[error.field]
    message = name + error.message[len(error.field):] if error.message.startswith(error.field) else error.message
    return ApiError(error.kind, message, name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
