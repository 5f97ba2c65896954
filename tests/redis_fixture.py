"""A real redis-server for the tests of the KV-event feed and the cluster (tests/conftest.py registers this
module as a plugin, so any test can ask for `redis_url`).

One server per session, on a free port, keeping nothing on disk. Tests share it by giving each test its own key
namespace rather than flushing, so they never depend on each other's order.
"""

from collections.abc import Iterator

import pytest

from cluster.redis_server import LocalRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = LocalRedis()  # fails with the install command when redis-server is missing (deploy/setup.sh adds it)
    yield server.url
    server.stop()
