"""The ingress's connections to the cluster's Redis, and how they report an outage.

Redis holds what makes serving better (the KV-block index, the groups' load reports) and what a few calls need
(stored responses, LoRA adapters loaded at run time); a request must never wait long on it. Every call has a time
limit: a Redis that hangs fails a call within it, one that is down fails it at once, and the callers serve on
without it.
"""

import logging

import redis.asyncio


def connect(url: str, timeout_s: float) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class OutageLog:
    """Logs a Redis outage once as it begins and once as it ends, however often the caller retries meanwhile."""

    def __init__(self, logger: logging.Logger, what: str, meanwhile: str):
        self.logger, self.what, self.meanwhile = logger, what, meanwhile
        self.down = False

    def failed(self, error: Exception) -> None:
        if not self.down:
            self.down = True
            self.logger.warning("%s: Redis did not answer (%s: %s); %s until it does", self.what,
                                type(error).__name__, error, self.meanwhile)

    def answered(self) -> None:
        if self.down:
            self.down = False
            self.logger.warning("%s: Redis answers again", self.what)
