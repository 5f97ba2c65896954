"""A local redis-server for `tandem serve` when no Redis URL is configured (a laptop, a single machine).

It holds only the KV-block index feed, which the worker groups rebuild as they run, so it keeps nothing on disk.
"""

import shutil
import socket
import subprocess
import time


class LocalRedis:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        """On `port`, or on a free one when None."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no Redis URL is configured and redis-server is not installed: install it "
                               "(apt-get install redis-server) or pass --redis-url redis://HOST:PORT")
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self._process = subprocess.Popen(
            [binary, "--bind", host, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_until_up()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def _wait_until_up(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._process.returncode} on port {self.port}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not accept connections on port {self.port} within {timeout_s} s")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
