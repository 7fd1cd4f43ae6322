"""Everything one router process holds: settings, the upstream pool, the
in-memory registry snapshot, route table, per-deployment statistics (shared
through Redis when configured) and dispatcher, agents, metrics.

The snapshot is reloaded when the registry changes, in a worker thread, so
CLI edits and other workers' or replicas' writes show up within seconds while
requests only ever read memory. SQLite: checked every `REGISTRY_POLL_INTERVAL`
seconds with `PRAGMA data_version`; the process uses one connection, so its
own writes (registrations, heartbeats) do not trigger a reload; the same poll
notices the database file deleted or replaced and reopens the path. Postgres:
a LISTEN connection wakes the process on another connection's configuration
change, and the change counters are compared every interval; a change of
agents only reads the agents; the database unreachable, requests go on from
the snapshot, writes answer 503 and both connections are reopened with
backoff, then everything is reloaded. A reload whose models did not change
only applies the agents that did. `readiness` answers /ready from when the
registry was last read. A second task deletes agents dead for
`AGENT_RETENTION` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from router.agent_policy import AgentPolicy, Credential
from router.agents import AgentDirectory
from router.auth import KeyTable
from router.budgets import Budgets
from router.cache import MemoryBackend, RedisBackend, ResponseCache
from router.config import Settings
from router.errors import RouterError, Scrubber
from router.observability import Metrics
from router.observability.observer import Observer
from router.observability.request_log import RequestLog, open_log, spend_by_key
from router.observability.tracing import Tracing
from router.ratelimit import LocalLimiter, RateLimiter
from router.responses_store import ResponseStore
from router.liveness import Liveness
from router.redis_link import RedisLink, RedisUnavailable
from router.registry import (AgentEntry, AgentNameTaken, Connection, RegistryUnavailable, Snapshot, SqliteStore,
                             open_store)
from router.registry.store import ChangeListener
from router.routing import RouteTable
from router.routing.breaker import Breaker, BreakerSettings
from router.routing.dispatch import Dispatcher
from router.routing.stats import StatsRegistry
from router.upstream import UpstreamClient
from router.weights import WeightStore

log = logging.getLogger("router.state")
T = TypeVar("T")
WRITE_BUSY_TIMEOUT = 1.5  # seconds a registry write waits for another writer's lock before answering 503
RECONNECT_BACKOFF = (0.5, 5.0)  # seconds between tries to reach a lost Postgres registry: first, most
METRICS_SYNC_INTERVAL = 1.0  # seconds between syncs of a worker's per-request metrics to the shared files
READY_STALE_AFTER = 5.0  # /ready fails when the registry was last read longer ago (3 poll intervals, if longer)


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
        self.store = open_store(settings)
        self.agents = AgentDirectory(settings.agent_ttl)
        self.metrics = Metrics()
        self.weights = WeightStore(settings, self.metrics)
        self.stats = StatsRegistry()  # per-deployment statistics: kept across route-table rebuilds
        self.routes = RouteTable(settings, self.http, self.agents, self.weights, self.stats)
        #: circuits per deployment, shared with other replicas through Redis
        self.breaker = Breaker(BreakerSettings.from_settings(settings), clock=self.stats.clock)
        self.breaker.on_eject = self._ejected
        self.dispatcher = Dispatcher(settings, self.stats.clock, resolve=self.routes.resolve, breaker=self.breaker,
                                     metrics=self.metrics)
        #: each request's end: metrics, budgets, the request log, the access log, the trace

        self.keys = KeyTable(settings.router_master_key)
        self.agent_policy = AgentPolicy(settings)
        self.agent_register_limits = LocalLimiter()  # AGENT_REGISTER_RPM per client address, in this process
        self.redis = RedisLink(settings, self.metrics) if settings.redis_url is not None else None
        self.liveness = Liveness(self.agents, self.redis, settings.agent_ttl)  # heartbeats: memory and Redis
        self.limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_tokens, self.metrics,
                                   self.redis, settings.rate_limit_on_redis_failure)
        backend = (RedisBackend(self.redis) if self.redis is not None
                   else MemoryBackend(settings.cache_max_entries, settings.cache_max_bytes, self.metrics))
        self.cache = ResponseCache(settings.cache_mode, settings.cache_ttl, backend, self.metrics)
        self.budgets = Budgets(settings, self.redis)  # spend limits per key, shared through Redis
        #: one row per request, written in batches off the request path
        self.request_log = RequestLog.from_settings(settings, self.metrics.request_log_dropped.inc)
        #: each request's end: metrics, budgets, the request log, the access log, the trace
        self.responses_store = ResponseStore(settings)  # the Responses API's stored answers (translated ones)
        self.tracing = Tracing.from_settings(settings)  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set
        self.dispatcher.tracing = self.tracing
        self.observer = Observer(settings, self.metrics, self.request_log, self.budgets, self.tracing)
        self.snapshot = Snapshot()  # what routing was last built from (keys and tokens are applied apart)
        self._conn: Connection | None = None  # reads and writes: our own commits never look like news
        self._file_id: tuple[int, int] | None = None  # SQLite: (st_dev, st_ino) of the file the connection opened
        self._listener: ChangeListener | None = self.store.listener()  # Postgres: LISTEN
        self._db_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._data_version: Hashable = -1
        self.registry_read_at = 0.0  # time.monotonic() of the last successful read of the registry (/ready)

    async def start(self) -> None:
        await self.http.start()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.open)  # LISTEN before loading: no change falls in between
        await self._open()
        await self.reload(full=True)
        await self.stats.start(self.redis)
        await self.breaker.start(self.redis)
        with contextlib.suppress(RedisUnavailable):
            await self.liveness.sync()  # the agents' liveness before the first request
        log.info("%s", self.agent_policy.describe())
        with contextlib.suppress(Exception):  # no readable log: budgets count from zero
            await self.budgets.seed(self.keys.keys.values(), self._spend_since)
        if self.request_log is not None:
            await self.request_log.start()
        watch = self._poll() if self._listener is None else self._listen(self._listener)
        self._tasks = [asyncio.create_task(watch, name="registry-watch"),
                       asyncio.create_task(self._purge_dead_agents(), name="agent-retention"),
                       asyncio.create_task(self.liveness.run(), name="agent-liveness")]
        if self.metrics.multiprocess:
            self._tasks.append(asyncio.create_task(self._sync_metrics(), name="metrics-sync"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self.request_log is not None:
            await self.request_log.stop()
        await self.budgets.stop()
        self.responses_store.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the spans still queued, within a bounded wait
        await self.stats.stop()
        await self.breaker.stop()
        await self.http.close()
        self.weights.close()
        if self.redis is not None:
            await self.redis.close()
        if self._conn is not None:
            self._conn.close()
        if self._listener is not None:
            self._listener.close()

    def _spend_since(self, since: dict[str, float]) -> dict[str, float]:
        """Keys' spend since their times, from the request log (a worker thread's call)."""
        conn = open_log(self.settings).connect()
        try:
            return spend_by_key(conn, since)
        finally:
            conn.close()

    async def _sync_metrics(self) -> None:
        """Several workers: this worker's per-request metrics into its multiprocess files, every second."""
        try:
            while True:
                await asyncio.sleep(METRICS_SYNC_INTERVAL)
                self.metrics.sync()
        finally:
            self.metrics.sync()  # what the last second added, before the worker exits

    def readiness(self) -> str | None:
        """Why this process should not take traffic now (None: ready), from state kept by the registry watch
        and the Redis link: nothing is asked of either here."""
        stale_after = max(READY_STALE_AFTER, 3 * self.settings.registry_poll_interval)
        age = time.monotonic() - self.registry_read_at
        if age > stale_after:
            return f"registry {self.store.location} not readable for {age:.0f}s"
        if self.redis is not None and self.redis.down:
            return "redis unavailable"
        return None

    # -- database access (never on the chat path) ----------------------------------

    def _connect(self) -> tuple[Connection, tuple[int, int] | None]:
        conn = self.store.connect(busy_timeout=WRITE_BUSY_TIMEOUT)
        if not isinstance(self.store, SqliteStore):
            return conn, None
        st = os.stat(self.store.path)
        return conn, (st.st_dev, st.st_ino)

    async def _open(self) -> None:
        async with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._conn, self._file_id = await asyncio.to_thread(self._connect)

    def _file_moved(self, path: str) -> bool:
        """The path no longer names the file we opened (deleted, or replaced)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RegistryUnavailable(f"registry {self.store.location} is not open")
        return self._conn

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        async with self._db_lock:
            return await asyncio.to_thread(fn, self._connection(), *args)

    async def write(self, fn: Callable[..., T], *args: object) -> T:
        """A registry write for an HTTP request: 503 with Retry-After when locked or unavailable."""
        try:
            async with self._db_lock:
                return await asyncio.to_thread(fn, self._connection(), *args)
        except self.store.unavailable_errors as exc:
            busy = self.store.is_busy(exc)
            log.warning("registry write failed: %s", exc)
            raise RouterError(503, "The registry is locked by another writer; retry shortly." if busy
                              else "The registry is unavailable; retry shortly.",
                              code="registry_busy" if busy else "registry_unavailable",
                              headers={"Retry-After": "1" if busy else "5"}) from None

    async def reload(self, full: bool = False, agents_only: bool = False) -> None:
        """Load the snapshot; rebuild routes if groups, deployments or aliases changed, else apply only the
        agents that did (`agents_only`: the version says nothing else changed, so only agents are read)."""
        if agents_only and not full:
            def load_agents(conn: Connection) -> tuple[Hashable, list[AgentEntry]]:
                return self.store.data_version(conn), self.store.load_agents(conn)

            self._data_version, agents = await self.read(load_agents)
            self._apply_agents(agents)
            self.snapshot = dataclasses.replace(self.snapshot, agents=agents)
            self.registry_read_at = time.monotonic()
            return

        def load(conn: Connection) -> tuple[Hashable, Snapshot]:
            return self.store.data_version(conn), self.store.load(conn)

        self._data_version, snapshot = await self.read(load)
        self.keys.replace(snapshot.keys)
        self.agent_policy.replace_tokens(snapshot.agent_tokens)
        old = self.snapshot
        if full or (snapshot.groups, snapshot.deployments, snapshot.aliases) != (old.groups, old.deployments,
                                                                                 old.aliases):
            self.agents.replace(snapshot.agents)
            # the group's limits, across clients, under its name (chat charges an alias to its group)
            self.limiter.model_limits = {g.name: (g.rpm, g.tpm) for g in snapshot.groups if g.rpm or g.tpm}
            self.routes.rebuild(snapshot)
            self.metrics.route_rebuilds.inc()
        else:
            self._apply_agents(snapshot.agents)
        self.snapshot = snapshot
        self.registry_read_at = time.monotonic()
        log.debug("registry snapshot: %d groups, %d deployments, %d agents", len(snapshot.groups),
                  len(snapshot.deployments), len(snapshot.agents))

    def _apply_agents(self, agents: list[AgentEntry]) -> None:
        """Apply the registry's agents; only a join, a leave, or new models or endpoint touches routes (a
        heartbeat written by another process changes nothing but the directory's heartbeat)."""
        incoming = {a.name for a in agents}
        for name in [n for n in self.agents.agents if n not in incoming]:
            self._forget_agent(name)
        for agent in agents:
            old = self.agents.upsert(agent)
            if old is None or old.models != agent.models or old.endpoint != agent.endpoint:
                self._agent_routes(agent.name, old.models if old is not None else (), agent.models)

    def _agent_routes(self, name: str, old_models: tuple[str, ...], new_models: tuple[str, ...]) -> None:
        self.routes.agent_changed(name, old_models, new_models)
        self.metrics.agent_route_updates.inc()

    # -- deployment health (the breaker's circuits, the statistics) ----------------------------------

    def _ejected(self, key: str, reason: str) -> None:
        model, deployment = self.metrics.deployment_label(key)
        self.metrics.ejections.labels(model, deployment).inc()
        log.warning("deployment %s of %s ejected: %s", deployment, model, reason)

    def deployment_health(self) -> list[dict[str, object]]:
        """Every routed deployment's state: its circuit (closed unless it failed lately), when it returns,
        why it is out, its requests in flight and latency estimates. For `/health/deployments` and
        `router health`; also refreshes the `router_deployment_state` gauge."""
        now, wall = self.stats.clock(), time.time()
        circuits = {c.key: c for c in self.breaker.states(now)}
        seen: set[int] = set()
        out: list[dict[str, object]] = []
        for group in (*self.routes.groups.values(), *self.routes.agent_groups.values()):
            if id(group) in seen:  # an alias: the same group again
                continue
            seen.add(id(group))
            for d in group.deployments:
                c = circuits.get(f"{d.group}\x00{d.id}")
                state = "closed" if c is None else c.state
                entry: dict[str, object] = {
                    "model": d.group, "deployment": d.id, "type": d.type, "enabled": d.enabled,
                    "live": d.healthy(), "state": state, "cooling": bool(c and c.cooling),
                    "in_flight": d.stats.load(), "ttft": d.stats.expected_latency(True, now),
                    "latency": d.stats.expected_latency(False, now)}
                if c is not None:
                    entry.update({"consecutive_failures": c.consecutive_failures, "total_failures": c.total_failures,
                                  "window_requests": c.window_requests, "window_failures": c.window_failures,
                                  "ejections": c.total_ejections, "reason": c.reason,
                                  "returns_at": wall + c.returns_in if c.returns_in > 0 else None})
                out.append(entry)
                if c is not None:
                    value = 3 if c.cooling and state == "closed" else {"closed": 0, "half-open": 1, "open": 2}[state]
                    self.metrics.deployment_state.labels(self.metrics.model_label(d.group), d.id).set(value)
        return out

    def _forget_agent(self, name: str) -> None:
        old = self.agents.remove(name)
        if old is not None:
            self._agent_routes(name, old.models, ())

    async def _poll(self) -> None:
        """SQLite: compare `PRAGMA data_version` every interval; reopen a file deleted or replaced."""
        assert isinstance(self.store, SqliteStore)
        path = self.store.path
        interval = self.settings.registry_poll_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                if self._conn is None or await asyncio.to_thread(self._file_moved, path):
                    if self._conn is not None:
                        log.warning("registry file %s was deleted or replaced; reopening it", path)
                    await self._open()
                    await self.reload(full=True)
                else:
                    version = await self.read(self.store.data_version)
                    if version != self._data_version:
                        await self.reload()
                    self.registry_read_at = time.monotonic()
                if failing:
                    log.info("registry readable again")
                failing = False
            except self.store.database_errors + (OSError,) as exc:
                if not failing:
                    log.error("registry %s unavailable: %s", path, exc)
                failing = True
            except Exception:  # a bug must not stop the poll: say so and keep polling
                log.exception("registry poll failed")

    async def _listen(self, listener: ChangeListener) -> None:
        """Postgres: wait for another connection's NOTIFY (or the poll interval), then compare the change
        counters; on a failure, reopen the listener and the connection with backoff and reload everything.
        Meanwhile requests are served from the snapshot and writes answer 503."""
        interval = self.settings.registry_poll_interval
        backoff = RECONNECT_BACKOFF[0]
        connected, failing = True, False
        while True:
            try:
                if not connected:
                    await asyncio.to_thread(listener.open)
                    await self._open()
                    await self.reload(full=True)
                    connected = True
                    log.warning("registry %s reachable again; snapshot reloaded", self.store.location)
                version = await asyncio.to_thread(listener.wait, interval, self._conn)
                if version != self._data_version:
                    await self.reload(agents_only=self.store.agents_only(self._data_version, version))
                self.registry_read_at = time.monotonic()
                backoff, failing = RECONNECT_BACKOFF[0], False
            except self.store.database_errors + (OSError,) as exc:
                if not failing:
                    log.error("registry %s unavailable (%s); serving from the last snapshot, reconnecting",
                              self.store.location, " ".join(str(exc).split()))
                connected, failing = False, True
                await asyncio.to_thread(listener.close)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF[1])
            except Exception:  # a bug must not stop the watch: say so and go on
                log.exception("registry watch failed")
                await asyncio.sleep(interval)

    async def _purge_dead_agents(self) -> None:
        """Every so often, delete agents that have been dead for AGENT_RETENTION seconds (database and memory).
        Death is judged by the heartbeats in memory (the registry's may be old: with Redis they are not
        written), and only while this process's view of them is current."""
        s = self.settings
        interval = min(60.0, max(0.2, s.agent_retention / 4))
        while True:
            await asyncio.sleep(interval)
            cutoff = time.time() - s.agent_ttl - s.agent_retention
            dead = [name for name, beat in self.agents.heartbeats.items() if beat < cutoff]
            if not dead or not self.liveness.trusted():
                continue
            try:
                names = await self.write(self.store.delete_dead_agents, cutoff, dead)
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
        self._agent_routes(name, old.models if old is not None else (), entry.models)
        return entry

    async def heartbeat(self, name: str, credential: Credential) -> bool:
        """False when the agent is unknown; AgentNameTaken when another credential registered it.

        Liveness is not configuration: the heartbeat goes to the directory, and to Redis when configured;
        without Redis (or while it fails) to SQLite at most once per AGENT_TTL/3 per agent, so other
        processes, which read it with their registry poll, agree within one TTL. No route changes."""
        now = time.time()
        entry = self.agents.agents.get(name)
        if entry is None:  # registered through another process, not polled yet: ask the registry (a read)
            entry = await self.write(self.store.load_agent, name)
            if entry is None:
                return False
            self.agents.upsert(entry)
            self._agent_routes(name, (), entry.models)
        if not (credential.admin or entry.token_name is None or entry.token_name == credential.name):
            raise AgentNameTaken(f"agent {name!r} is registered with another credential")
        self.agents.beat(name, now)
        if await self.liveness.publish(name, now) or not self.liveness.persist_due(entry.last_heartbeat, now):
            return True
        claimed = dataclasses.replace(entry, last_heartbeat=now)  # concurrent heartbeats do not write twice
        self.agents.agents[name] = claimed
        try:
            stored = await self.write(self.store.heartbeat, name, now, credential.name, credential.admin)
        except RouterError:  # locked: this process heard it; the next heartbeat writes it
            if self.agents.agents.get(name) is claimed:
                self.agents.agents[name] = entry
            return True
        if stored is None:  # deleted meanwhile (retention, another process): the agent registers again
            self._forget_agent(name)
            return False
        return True
