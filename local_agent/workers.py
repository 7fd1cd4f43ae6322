"""Worker lifecycle: start each engine, wait until it is healthy, watch it,
restart it with backoff when it crashes, stop it on shutdown; and pick, per
model, the healthy worker with the fewest requests in flight.

States: `starting` -> `healthy` <-> `unhealthy`; a process that exits (or never
gets healthy within `start_timeout`) goes to `restarting`, waits 1, 2, 4 ...
seconds (up to `restart_backoff_max`) and starts again; `stopping` ->
`stopped` on shutdown. An external server is never restarted, only watched.
A change in the set of healthy models calls `on_change` (the announcer
re-registers at once). `/workers` reports the engine the agent launched, and
for an external server `external` with what its `/v1/models` says (`owned_by`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import orjson
from yarl import URL

from local_agent.config import AgentSettings, WorkerSpec
from local_agent.launchers import ExternalLauncher, Launcher, launcher_for
from router.model_rename import ModelRename

log = logging.getLogger("local_agent.workers")
HEALTH_TIMEOUT = 3.0
#: failed health checks in a row before a healthy worker counts as unhealthy
UNHEALTHY_AFTER = 2
#: a worker healthy this long has its restart backoff reset
STABLE_AFTER = 60.0


class Worker:
    def __init__(self, index: int, spec: WorkerSpec, launcher: Launcher) -> None:
        self.index = index
        self.spec = spec
        self.launcher = launcher
        self.state = "stopped"
        self.in_flight = 0
        self.requests = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.since = time.time()
        base = launcher.base_url
        self.urls = {path: URL(base + path, encoded=True)
                     for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", spec.health)}
        # an external server that knows the model by another name: requests and answers are renamed
        self.rename = (ModelRename(spec.model, spec.upstream_model)
                       if spec.upstream_model not in (None, spec.model) else None)
        self.external = isinstance(launcher, ExternalLauncher)
        self.owned_by: str | None = None  # an external server's own word on who serves the model

    def done(self) -> None:
        """A request to this worker ended (answered, streamed to the end, or failed)."""
        self.in_flight -= 1

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def snapshot(self) -> dict[str, object]:
        return {
            "index": self.index,
            "model": self.spec.model,
            # what is true: the engine the agent launched; an external server is whatever it says it is
            "engine": "external" if self.external else self.spec.engine,
            "owned_by": self.owned_by,
            "upstream_model": self.rename.upstream if self.rename else None,
            "launcher": self.spec.launcher,
            "url": self.launcher.base_url,
            "state": self.state,
            "since": self.since,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "restarts": self.restarts,
            "last_error": self.last_error,
            **self.launcher.describe(),
        }


class Supervisor:
    def __init__(self, settings: AgentSettings, on_change: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.on_change = on_change
        self.workers = [Worker(i, spec, launcher_for(spec, settings.log_dir))
                        for i, spec in enumerate(settings.workers)]
        self.by_model: dict[str, list[Worker]] = {}
        for w in self.workers:
            self.by_model.setdefault(w.spec.model, []).append(w)
        self._turn: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._healthy_models: tuple[str, ...] = ()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT))
        self._tasks = [asyncio.create_task(self._run(w), name=f"worker-{w.index}") for w in self.workers]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for w in self.workers:
            self._set(w, "stopping")
        await asyncio.gather(*(w.launcher.stop() for w in self.workers), return_exceptions=True)
        for w in self.workers:
            self._set(w, "stopped")
        if self._session is not None:
            await self._session.close()

    # -- state -------------------------------------------------------------------

    def healthy_models(self) -> list[str]:
        return list(self._healthy_models)

    def _set(self, worker: Worker, state: str, error: str | None = None) -> None:
        if error is not None:
            worker.last_error = error
        if worker.state == state:
            return
        log.info("worker %s (#%d): %s -> %s%s", worker.spec.model, worker.index, worker.state, state,
                 f" ({error})" if error else "")
        worker.state, worker.since = state, time.time()
        healthy = tuple(sorted({w.spec.model for w in self.workers if w.healthy}))
        if healthy != self._healthy_models:
            self._healthy_models = healthy
            self.on_change()

    def pick(self, model: str, exclude: tuple[Worker, ...] = ()) -> Worker | None:
        """The healthy worker of `model` with the fewest requests in flight; ties take turns."""
        workers = self.by_model.get(model)
        if not workers:
            return None
        start = self._turn[model] = (self._turn.get(model, -1) + 1) % len(workers)
        best: Worker | None = None
        for i in range(len(workers)):
            w = workers[(start + i) % len(workers)]
            if w.healthy and w not in exclude and (best is None or w.in_flight < best.in_flight):
                best = w
        return best

    def suspect(self, worker: Worker, error: str) -> None:
        """A request could not reach the worker: out of rotation until a health check passes."""
        if worker.healthy:
            self._set(worker, "unhealthy", error)

    # -- one worker's life ---------------------------------------------------------

    async def _check(self, worker: Worker) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(worker.urls[worker.spec.health]) as resp:
                body = await resp.read()
                if resp.status == 200 and worker.external and worker.spec.health == "/v1/models":
                    worker.owned_by = _owned_by(body, worker.rename.upstream if worker.rename else worker.spec.model)
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _run(self, worker: Worker) -> None:
        backoff = 1.0
        while True:
            self._set(worker, "starting")
            try:
                await worker.launcher.start()
            except OSError as exc:
                self._set(worker, "restarting", f"could not start: {exc}")
            else:
                healthy_for = await self._watch(worker)
                if healthy_for >= STABLE_AFTER:
                    backoff = 1.0
                with contextlib.suppress(OSError):
                    await worker.launcher.stop()
            worker.restarts += 1
            log.warning("worker %s (#%d): restarting in %.0fs", worker.spec.model, worker.index, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.restart_backoff_max)

    async def _watch(self, worker: Worker) -> float:
        """Wait for health, then watch until the engine exits or never got healthy.

        Returns how long it was healthy. An external server is watched forever."""
        spec, launcher = worker.spec, worker.launcher
        external = isinstance(launcher, ExternalLauncher)
        deadline = time.monotonic() + spec.start_timeout
        healthy_at: float | None = None
        failures = 0
        while True:
            interval = spec.health_interval if worker.state in ("healthy", "unhealthy") else 0.5
            code = await launcher.wait_exit(interval)
            if code is not None:
                self._set(worker, "restarting", f"engine exited with code {code}")
                return time.monotonic() - healthy_at if healthy_at is not None else 0.0
            ok = await self._check(worker)
            if ok:
                failures = 0
                if healthy_at is None:
                    healthy_at = time.monotonic()
                    log.info("worker %s (#%d): healthy at %s", spec.model, worker.index, launcher.base_url)
                self._set(worker, "healthy")
                continue
            failures += 1
            if worker.state == "healthy" and failures >= UNHEALTHY_AFTER:
                self._set(worker, "unhealthy", f"health check {spec.health} failed")
            if healthy_at is None and not external and time.monotonic() > deadline:
                self._set(worker, "restarting", f"not healthy within {spec.start_timeout:.0f}s")
                return 0.0


def _owned_by(body: bytes, model: str) -> str | None:
    """`owned_by` of `model` (else of the first model) in a `/v1/models` answer; None if it has none."""
    try:
        data = orjson.loads(body)["data"]
        entry = next((m for m in data if m.get("id") == model), data[0])
        owner = entry.get("owned_by")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return owner[:100] if isinstance(owner, str) else None
