"""Run the router the way a user does: `python -m router.cli ...` in a child
process, on a free loopback port, with its own registry and log folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

# Our configuration variables: cleared from the inherited environment so a
# developer's shell never leaks into a test.
CONFIG_PREFIXES = ("ROUTER_", "SQLITE_", "REGISTRY_", "AGENT_", "LOCAL_AGENT", "OPENAI_", "EXTERNAL_", "LLMD_",
                   "ANTHROPIC_", "GOOGLE_", "OPENROUTER_", "GROK_", "VENICE_", "HF_", "HUGGING_FACE", "UPSTREAM_",
                   "MAX_BODY", "REDIS_", "CACHE_", "RATE_LIMIT", "LOG_", "PROMETHEUS_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIXES)}
    env.update({"SQLITE_DB_PATH": str(workdir / "data" / "models.db"), "LOG_DIR": str(workdir / "logs"),
                "REGISTRY_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1",
                # the default 60 requests/min per client would throttle the suite; limit tests set their own
                "RATE_LIMIT_REQUESTS": "0"})
    env.update(extra or {})
    return env


def run_cli(workdir: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=workdir, env=clean_env(workdir, env),
                          capture_output=True, text=True, timeout=timeout)


class RouterProcess:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.workdir = workdir
        self.env = clean_env(workdir, env)
        self.port = free_port()
        self.workers = workers
        self.log_path = workdir / f"router-{self.port}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> RouterProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers)],
            cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"router did not become healthy:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        merged = {k: v for k, v in self.env.items() if k.startswith(CONFIG_PREFIXES)}
        merged.update(env or {})
        return run_cli(self.workdir, *args, env=merged)
