"""How a worker's engine runs: a child process, a Docker container, or an
external server that is already running.

A launcher starts the engine, reports when it exits, and stops it (SIGTERM,
then SIGKILL after `stop_timeout`). The docker launcher is the process
launcher with another command: `docker run` in the foreground, so the
container's life is the child's life. Engine output goes to
`<log_dir>/worker-<model>-<port>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from abc import ABC, abstractmethod
from pathlib import Path

from local_agent.config import WorkerSpec

log = logging.getLogger("local_agent.launchers")
#: vLLM's OpenAI server inside the container
DOCKER_ENGINE_PORT = 8000


class Launcher(ABC):
    def __init__(self, spec: WorkerSpec, log_dir: str) -> None:
        self.spec = spec
        self.log_dir = Path(log_dir)

    @property
    @abstractmethod
    def base_url(self) -> str:
        """Where the engine answers OpenAI requests (no /v1)."""

    async def start(self) -> None:  # noqa: B027 - an external server has nothing to start
        """Start the engine (returns at once; health is checked by the supervisor)."""

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code if the engine exits within `timeout` seconds, else None."""
        await asyncio.sleep(timeout)
        return None

    async def stop(self) -> None:  # noqa: B027 - nor to stop
        """Stop the engine and wait for it to be gone."""

    def describe(self) -> dict[str, object]:
        return {}


class ExternalLauncher(Launcher):
    """A server someone else runs (vLLM, llama.cpp, SGLang, TGI, Ollama): only watched."""

    @property
    def base_url(self) -> str:
        url = (self.spec.url or "").rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


class ProcessLauncher(Launcher):
    """The engine as a child process in its own process group."""

    def __init__(self, spec: WorkerSpec, log_dir: str) -> None:
        super().__init__(spec, log_dir)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "::") else self.spec.host
        return f"http://{host}:{self.spec.port}"

    def command(self) -> list[str]:
        s = self.spec
        if s.command:
            return [*s.command, *s.args]
        return [s.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", s.weights or s.model, "--served-model-name", s.model,
                "--host", s.host, "--port", str(s.port), *s.args]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.spec.env}

    @property
    def log_path(self) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.spec.model)
        return self.log_dir / f"worker-{safe}-{self.spec.port}.log"

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with await asyncio.to_thread(open, self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=self.environment(), start_new_session=True)
        log.info("worker %s: started pid %d: %s (output: %s)", self.spec.model, self.proc.pid,
                 " ".join(command), self.log_path)

    async def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return await super().wait_exit(timeout)
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
        except TimeoutError:
            return None

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        if await self.wait_exit(self.spec.stop_timeout) is None:
            log.warning("worker %s: pid %d ignored SIGTERM for %.0fs; killing it", self.spec.model, proc.pid,
                        self.spec.stop_timeout)
            self._signal(signal.SIGKILL)
            await proc.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        """Engines fork helpers (vLLM's engine core); none may outlive the worker."""
        self._signal(signal.SIGKILL)

    def describe(self) -> dict[str, object]:
        proc = self.proc
        return {"pid": proc.pid if proc else None, "command": self.command(), "log": str(self.log_path)}


class DockerLauncher(ProcessLauncher):
    """`docker run` of the vLLM OpenAI image in the foreground, with the GPUs, the port and the model cache."""

    @property
    def container(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.spec.model).strip("-.") or "model"
        return f"local-agent-{safe}-{self.spec.port}"

    def gpus_flag(self) -> str:
        gpus = self.spec.gpus.strip()
        return gpus if gpus == "all" else f'"device={gpus}"'

    def command(self) -> list[str]:
        s = self.spec
        cache = str(Path(s.cache_dir).expanduser())
        env_flags = [flag for name in sorted(s.env) for flag in ("-e", name)]
        return [s.docker, "run", "--rm", "--name", self.container,
                "--gpus", self.gpus_flag(), "--ipc=host",
                "-p", f"{s.host}:{s.port}:{DOCKER_ENGINE_PORT}",
                "-v", f"{cache}:/root/.cache/huggingface",
                "-e", "HUGGING_FACE_HUB_TOKEN", *env_flags,
                s.image,
                "--model", s.weights or s.model, "--served-model-name", s.model, *s.args]

    async def start(self) -> None:
        await self._docker("rm", "-f", self.container)  # a container left by a crashed agent holds the name
        await super().start()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self._docker("stop", "-t", str(int(self.spec.stop_timeout)), self.container)
        await super().stop()

    async def _docker(self, *args: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(self.spec.docker, *args, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            await asyncio.wait_for(proc.wait(), self.spec.stop_timeout + 10)
        except (TimeoutError, OSError) as exc:
            log.warning("worker %s: docker %s failed: %s", self.spec.model, args[0], exc)


LAUNCHERS: dict[str, type[Launcher]] = {
    "external": ExternalLauncher,
    "process": ProcessLauncher,
    "docker": DockerLauncher,
}


def launcher_for(spec: WorkerSpec, log_dir: str) -> Launcher:
    return LAUNCHERS[spec.launcher](spec, log_dir)
