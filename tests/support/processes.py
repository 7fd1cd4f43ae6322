"""Run the router, the Local Agent and inference engines the way a user does:
child processes on free loopback ports, each with its own working folder,
environment and output file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import httpx
import openai
import yaml

# Our configuration variables: cleared from the inherited environment so a
# developer's shell never leaks into a test.
CONFIG_PREFIXES = ("ROUTER_", "SQLITE_", "REGISTRY_", "AGENT_", "LOCAL_AGENT", "OPENAI_", "EXTERNAL_", "LLMD_",
                   "ANTHROPIC_", "GOOGLE_", "OPENROUTER_", "GROK_", "VENICE_", "HF_", "HUGGING_FACE", "UPSTREAM_",
                   "MAX_BODY", "REDIS_", "CACHE_", "RATE_LIMIT", "LOG_", "PROMETHEUS_", "DATABASE_URL",
                   "SHUTDOWN_")
# Settings every child process of the running test gets (the `registry_backend` fixture puts DATABASE_URL here)
TEST_ENV: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIXES)}
    env.update({"SQLITE_DB_PATH": str(workdir / "data" / "models.db"), "LOG_DIR": str(workdir / "logs"),
                "REGISTRY_POLL_INTERVAL": "0.2", "PYTHONUNBUFFERED": "1",  # rate limits: off unless a test sets them
                "SHUTDOWN_DELAY": "0"})  # a stopped router closes its listener at once (test_shutdown.py sets it)
    env.update(TEST_ENV)
    env.update(extra or {})
    return env


def run_cli(workdir: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=workdir, env=clean_env(workdir, env),
                          capture_output=True, text=True, timeout=timeout)


class Service(ABC):
    """A server in a child process (own process group) that answers GET `health_path` with 200 when ready."""

    name = "service"
    health_path = "/health"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.workdir = workdir
        self.env = clean_env(workdir, env)
        self.port = port or free_port()
        self.log_path = workdir / f"{self.name}-{self.port}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that starts it."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30):  # type: ignore[no-untyped-def]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become healthy:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()
            return self.proc.returncode
        return None

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


class RouterProcess(Service):
    """`python -m router.cli serve`, with its own registry and log folder."""

    name = "router"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, workers: int = 1,
                 port: int | None = None) -> None:
        super().__init__(workdir, env, port)
        self.workers = workers

    def command(self) -> list[str]:
        return [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers)]

    def start(self, timeout: float = 30) -> RouterProcess:
        return super().start(timeout)  # type: ignore[no-any-return]

    def client(self, **kwargs: object) -> openai.OpenAI:
        options: dict[str, object] = {"max_retries": 0, "timeout": 30, **kwargs}
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", **options)  # type: ignore[arg-type]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        merged = {k: v for k, v in self.env.items() if k.startswith(CONFIG_PREFIXES)}
        merged.update(env or {})
        return run_cli(self.workdir, *args, env=merged)


class AgentProcess(Service):
    """The Local Agent as its README runs it: `uvicorn local_agent.main:app`, configured by a YAML file."""

    name = "agent"

    def __init__(self, workdir: Path, config: dict[str, object], env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        super().__init__(workdir, env, port)
        config = {"endpoint": f"http://127.0.0.1:{self.port}", "log_dir": str(workdir / "logs"), **config}
        token = config.get("router_token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.config_path = workdir / f"agent-{self.port}.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))
        self.env["AGENT_CONFIG"] = str(self.config_path)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "local_agent.main:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log"]

    def start(self, timeout: float = 30) -> AgentProcess:
        return super().start(timeout)  # type: ignore[no-any-return]

    def workers(self) -> dict[str, object]:
        resp = httpx.get(self.url + "/workers", headers=self.headers, timeout=5)
        resp.raise_for_status()
        return resp.json()


class LlamaCppServer(Service):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) serving a GGUF file."""

    name = "llama-cpp"
    health_path = "/v1/models"

    def __init__(self, workdir: Path, model: Path, alias: str, port: int | None = None) -> None:
        super().__init__(workdir, None, port)
        self.model = model
        self.alias = alias

    def command(self) -> list[str]:
        return llama_cpp_command(self.model, self.alias, self.port)

    def start(self, timeout: float = 60) -> LlamaCppServer:
        return super().start(timeout)  # type: ignore[no-any-return]


def llama_cpp_command(model: Path, alias: str, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "false",
            # queue concurrent requests instead of cutting the running one short (its default)
            "--interrupt_requests", "false"]
