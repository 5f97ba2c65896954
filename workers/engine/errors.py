"""Typed errors of the engine.

Each is a ValueError subclass so a caller that only knows "bad input" can catch ValueError, while the gRPC
layer maps each class to its own status code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND, ...).
"""


class InvalidRequestError(ValueError):
    """The request itself is malformed: a bad sampling parameter, an empty prompt, an unknown token id.

    `field` names the offending field so an API layer can tell the client exactly what to fix.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        # Errors cross process boundaries (Ray actors, Serve replicas) by pickle, which rebuilds from these.
        return type(self), (self.field, self.message)


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context window (or the whole KV cache)."""

    def __init__(self, num_tokens: int, limit: int, what: str = "the model's context length"):
        super().__init__("prompt", f"{num_tokens} tokens exceed {what} ({limit}); shorten the prompt")
        self.num_tokens = num_tokens
        self.limit = limit
        self.what = what

    def __reduce__(self):
        return type(self), (self.num_tokens, self.limit, self.what)


class ModelNotFoundError(ValueError):
    """The model name or path resolves to nothing loadable."""


class DuplicateRequestError(ValueError):
    """A request id is already in flight; ids must be unique among running requests."""


class KVCacheFullError(RuntimeError):
    """No free KV blocks for a request that must be placed now (KV arriving from a prefill group)."""


class RequestFailedError(RuntimeError):
    """A request ended without its result: aborted, or its engine step failed."""


class GroupBrokenError(RequestFailedError):
    """A collective of a tensor-parallel group failed (a rank died or left): the group cannot go on."""


class LoRAError(ValueError):
    """A LoRA adapter that cannot run on this model; the message names the adapter and what is wrong."""
