"""Tandem's own log lines in a Serve replica's log, and in a rank's.

In a replica Serve sets up only its `ray.serve` logger (a file per replica under the session's logs/serve, each
line tagged with the replica and request id, plus stderr) and leaves the root logger alone, so the INFO lines of
Tandem's modules (a routing decision per request, a group started, a prefix hand-off) went nowhere. Each replica
sends them through Serve's handlers, at Serve's level (a deployment's `logging_config`).
"""

import logging

SERVE_LOGGER = "ray.serve"  # the logger Serve's documentation has user code log through
PACKAGES = ("cluster", "router", "workers")


def use_serve_logging() -> None:
    """Called in a replica's constructor, after Serve configured its logger for the replica."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    _send_packages_to(list(serve_logger.handlers), serve_logger.level)


def use_rank_logging() -> None:
    """Called in a rank's constructor. A rank is a plain Ray actor, where nothing configures logging: only warnings
    would reach stderr (Python's last-resort handler), and the engine's INFO lines (its KV cache size, the CUDA
    graphs it captured) would be lost. They go to stderr, which Ray keeps in the worker's log file and shows on
    the driver tagged with the actor."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _send_packages_to([handler], logging.INFO)


def _send_packages_to(handlers: list[logging.Handler], level: int) -> None:
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = list(handlers)
        logger.setLevel(level)
        logger.propagate = False
