"""Everything one router process holds: settings, the upstream pool, the
in-memory registry snapshot and route table, agents, metrics.

The snapshot is reloaded from SQLite when the database changes (checked every
`REGISTRY_POLL_INTERVAL` seconds with `PRAGMA data_version`, in a worker
thread), so CLI edits and other workers' writes show up within seconds while
requests only ever read memory. The process uses one connection, so its own
writes (registrations, heartbeats) do not trigger a reload; a reload whose
models did not change only applies the agents that did. The same poll notices
the database file deleted or replaced and reopens the path. A second task
deletes agents dead for `AGENT_RETENTION` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from router.agent_policy import AgentPolicy, Credential
from router.agents import AgentDirectory
from router.auth import KeyTable
from router.cache import MemoryBackend, RedisBackend, ResponseCache
from router.config import Settings
from router.errors import RouterError, Scrubber
from router.observability import Metrics
from router.ratelimit import LocalLimiter, RateLimiter
from router.redis_link import RedisLink
from router.registry import AgentEntry, AgentToken, ClientKey, ModelEntry, RegistryStore
from router.routing import RouteTable
from router.upstream import UpstreamClient
from router.weights import WeightStore

log = logging.getLogger("router.state")
T = TypeVar("T")
WRITE_BUSY_TIMEOUT = 1.5  # seconds a registry write waits for another writer's lock before answering 503


def secrets_of(settings: Settings) -> list[str]:
    values = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            values.append(value.get_secret_value())
    return values


class RouterState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scrub = Scrubber(secrets_of(settings))
        self.http = UpstreamClient.from_settings(settings, self.scrub)
        self.store = RegistryStore(settings.sqlite_db_path)
        self.agents = AgentDirectory(settings.agent_ttl)
        self.metrics = Metrics()
        self.weights = WeightStore(settings, self.metrics)
        self.routes = RouteTable(settings, self.http, self.agents, self.weights)
        self.keys = KeyTable(settings.router_master_key)
        self.agent_policy = AgentPolicy(settings)
        self.agent_register_limits = LocalLimiter()  # AGENT_REGISTER_RPM per client address, in this process
        self.redis = RedisLink(settings, self.metrics) if settings.redis_url is not None else None
        self.limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_tokens, self.metrics,
                                   self.redis, settings.rate_limit_on_redis_failure)
        backend = (RedisBackend(self.redis) if self.redis is not None
                   else MemoryBackend(settings.cache_max_entries, settings.cache_max_bytes, self.metrics))
        self.cache = ResponseCache(settings.cache_mode, settings.cache_ttl, backend, self.metrics)
        self.models: list[ModelEntry] = []
        self._conn: sqlite3.Connection | None = None  # reads and writes: our own commits never look like news
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connection opened
        self._db_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._data_version = -1

    async def start(self) -> None:
        await self.http.start()
        await self._open()
        await self.reload(full=True)
        log.info("%s", self.agent_policy.describe())
        self._tasks = [asyncio.create_task(self._poll(), name="registry-poll"),
                       asyncio.create_task(self._purge_dead_agents(), name="agent-retention")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.http.close()
        self.weights.close()
        if self.redis is not None:
            await self.redis.close()
        if self._conn is not None:
            self._conn.close()

    # -- database access (never on the chat path) ----------------------------------

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        conn = self.store.connect(busy_timeout=WRITE_BUSY_TIMEOUT)
        st = os.stat(self.store.path)
        return conn, (st.st_dev, st.st_ino)

    async def _open(self) -> None:
        async with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._conn, self._file_id = await asyncio.to_thread(self._connect)

    def _file_moved(self) -> bool:
        """The path no longer names the file we opened (deleted, or replaced)."""
        try:
            st = os.stat(self.store.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError(f"registry {self.store.path} is not open")
        return self._conn

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        async with self._db_lock:
            return await asyncio.to_thread(fn, self._connection(), *args)

    async def write(self, fn: Callable[..., T], *args: object) -> T:
        """A registry write for an HTTP request: 503 with Retry-After when locked or unavailable."""
        try:
            async with self._db_lock:
                return await asyncio.to_thread(fn, self._connection(), *args)
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            log.warning("registry write failed: %s", exc)
            raise RouterError(503, "The registry is locked by another writer; retry shortly." if busy
                              else "The registry is unavailable; retry shortly.",
                              code="registry_busy" if busy else "registry_unavailable",
                              headers={"Retry-After": "1" if busy else "5"}) from None

    async def reload(self, full: bool = False) -> None:
        """Load the snapshot; rebuild routes if the models changed, else apply only the agents that did."""
        def load(conn: sqlite3.Connection) -> tuple[int, list[ModelEntry], list[AgentEntry], list[ClientKey],
                                                    list[AgentToken]]:
            version = self.store.data_version(conn)
            models, agents = self.store.load(conn)
            return version, models, agents, self.store.load_keys(conn), self.store.load_agent_tokens(conn)

        self._data_version, models, agents, keys, tokens = await self.read(load)
        self.keys.replace(keys)
        self.agent_policy.replace_tokens(tokens)
        if full or models != self.models:
            self.models = models
            self.agents.replace(agents)
            self.limiter.model_limits = {m.name: (m.rpm, m.tpm) for m in models if m.rpm or m.tpm}
            self.routes.rebuild(models)
        else:
            self._apply_agents(agents)
        log.debug("registry snapshot: %d models, %d agents", len(models), len(agents))

    def _apply_agents(self, agents: list[AgentEntry]) -> None:
        incoming = {a.name for a in agents}
        for name in [n for n in self.agents.agents if n not in incoming]:
            self._forget_agent(name)
        for agent in agents:
            old = self.agents.upsert(agent)
            if old is None or old.models != agent.models:
                self.routes.agent_changed(agent.name, old.models if old is not None else (), agent.models)

    def _forget_agent(self, name: str) -> None:
        old = self.agents.remove(name)
        if old is not None:
            self.routes.agent_changed(name, old.models, ())

    async def _poll(self) -> None:
        interval = self.settings.registry_poll_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                if self._conn is None or await asyncio.to_thread(self._file_moved):
                    if self._conn is not None:
                        log.warning("registry file %s was deleted or replaced; reopening it", self.store.path)
                    await self._open()
                    await self.reload(full=True)
                else:
                    version = await self.read(self.store.data_version)
                    if version != self._data_version:
                        await self.reload()
                if failing:
                    log.info("registry readable again")
                failing = False
            except (sqlite3.Error, OSError) as exc:
                if not failing:
                    log.error("registry %s unavailable: %s", self.store.path, exc)
                failing = True
            except Exception:  # a bug must not stop the poll: say so and keep polling
                log.exception("registry poll failed")

    async def _purge_dead_agents(self) -> None:
        """Every so often, delete agents that have been dead for AGENT_RETENTION seconds (database and memory)."""
        s = self.settings
        interval = min(60.0, max(0.2, s.agent_retention / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                names = await self.write(self.store.delete_dead_agents, time.time() - s.agent_ttl - s.agent_retention)
            except RouterError:  # locked or unavailable: next time
                continue
            for name in names:
                self._forget_agent(name)
            if names:
                log.info("deleted %d agents dead for over %gs", len(names), s.agent_retention)

    # -- agents ------------------------------------------------------------------

    async def register_agent(self, name: str, endpoint: str, models: list[str], credential: Credential) -> AgentEntry:
        entry = await self.write(self.store.register_agent, name, endpoint, models, time.time(), credential.name,
                                 credential.admin)
        old = self.agents.upsert(entry)
        self.routes.agent_changed(name, old.models if old is not None else (), entry.models)
        return entry

    async def heartbeat(self, name: str, credential: Credential) -> bool:
        """False when the agent is unknown; AgentNameTaken when another credential registered it."""
        now = time.time()
        entry = await self.write(self.store.heartbeat, name, now, credential.name, credential.admin)
        if entry is None:
            return False
        if name not in self.agents.agents:  # registered through another worker: add it now
            self.agents.upsert(entry)
            self.routes.agent_changed(name, (), entry.models)
        self.agents.beat(name, now)
        return True
