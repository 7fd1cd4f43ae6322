"""Everything one router process holds: settings, the upstream pool, the
in-memory registry snapshot and route table, agents, metrics.

The snapshot is reloaded from SQLite when the database changes (checked every
`REGISTRY_POLL_INTERVAL` seconds with `PRAGMA data_version`, in a worker
thread), so CLI edits and other workers' writes show up within seconds while
requests only ever read memory.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from router.agents import AgentDirectory
from router.auth import KeyTable
from router.cache import MemoryBackend, RedisBackend, ResponseCache
from router.config import Settings
from router.errors import Scrubber
from router.observability import Metrics
from router.ratelimit import RateLimiter
from router.redis_link import RedisLink
from router.registry import AgentEntry, ClientKey, ModelEntry, RegistryStore
from router.routing import RouteTable
from router.upstream import UpstreamClient
from router.weights import WeightStore

log = logging.getLogger("router.state")
T = TypeVar("T")


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
        self.redis = RedisLink(settings, self.metrics) if settings.redis_url is not None else None
        self.limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_tokens, self.metrics,
                                   self.redis, settings.rate_limit_on_redis_failure)
        backend = (RedisBackend(self.redis) if self.redis is not None
                   else MemoryBackend(settings.cache_max_entries, settings.cache_max_bytes, self.metrics))
        self.cache = ResponseCache(settings.cache_mode, settings.cache_ttl, backend, self.metrics)
        self.models: list[ModelEntry] = []
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._db_lock = asyncio.Lock()
        self._poll_task: asyncio.Task[None] | None = None
        self._data_version = -1

    async def start(self) -> None:
        await self.http.start()
        self._reader = await asyncio.to_thread(self.store.connect)
        self._writer = await asyncio.to_thread(self.store.connect)
        await self.reload()
        self._poll_task = asyncio.create_task(self._poll(), name="registry-poll")

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
        await self.http.close()
        self.weights.close()
        if self.redis is not None:
            await self.redis.close()
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()

    # -- database access (never on the chat path) ----------------------------------

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        async with self._db_lock:
            return await asyncio.to_thread(fn, self._reader, *args)

    async def write(self, fn: Callable[..., T], *args: object) -> T:
        async with self._db_lock:
            return await asyncio.to_thread(fn, self._writer, *args)

    async def reload(self) -> None:
        def load(conn: sqlite3.Connection) -> tuple[int, list[ModelEntry], list[AgentEntry], list[ClientKey]]:
            version = self.store.data_version(conn)
            models, agents = self.store.load(conn)
            return version, models, agents, self.store.load_keys(conn)

        self._data_version, models, agents, keys = await self.read(load)
        self.models = models
        self.agents.replace(agents)
        self.keys.replace(keys)
        self.limiter.model_limits = {m.name: (m.rpm, m.tpm) for m in models if m.rpm or m.tpm}
        self.routes.rebuild(models)
        log.debug("registry snapshot: %d models, %d agents", len(models), len(agents))

    async def _poll(self) -> None:
        interval = self.settings.registry_poll_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                version = await self.read(self.store.data_version)
                if version != self._data_version:
                    await self.reload()
                if failing:
                    log.info("registry readable again")
                failing = False
            except (sqlite3.Error, OSError) as exc:
                if not failing:
                    log.error("registry reload failed: %s", exc)
                failing = True

    # -- agents ------------------------------------------------------------------

    async def register_agent(self, name: str, endpoint: str, models: list[str]) -> AgentEntry:
        entry = await self.write(self.store.register_agent, name, endpoint, models, time.time())
        self.agents.upsert(entry)
        self.routes.rebuild(self.models)
        return entry

    async def heartbeat(self, name: str) -> bool:
        now = time.time()
        if not await self.write(self.store.heartbeat, name, now):
            return False
        if name not in self.agents.agents:  # registered through another worker: catch up now
            await self.reload()
        self.agents.beat(name, now)
        return True
