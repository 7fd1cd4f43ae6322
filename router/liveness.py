"""Agent liveness across router processes, kept out of the registry.

A heartbeat updates this process's `AgentDirectory` at once. With Redis it is also written as
`SET agent-live:{name} <unix time> PX <AGENT_TTL>`, and a task reads every known agent's key with one MGET
every `sync_interval` (at most 1 s), so replicas learn of heartbeats they did not receive within a second.
Without Redis, or while it fails, `persist_due` lets the caller write the heartbeat to SQLite at most once per
AGENT_TTL/3 per agent; the other processes read it with their registry poll. Chat requests only ever read the
directory.
"""

from __future__ import annotations

import asyncio
import logging
import time

from router.agents import AgentDirectory
from router.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger("router.liveness")

KEY_PREFIX = "agent-live:"
SYNC_INTERVAL = 1.0  # seconds between two reads of the other processes' heartbeats (shorter when AGENT_TTL is)


class Liveness:
    def __init__(self, directory: AgentDirectory, redis: RedisLink | None, ttl: float) -> None:
        self.directory = directory
        self.redis = redis
        self.ttl = ttl
        self.sync_interval = min(SYNC_INTERVAL, ttl / 3)
        self.persist_interval = ttl / 3
        self.synced_at = 0.0  # time.monotonic() of the last successful read from Redis

    async def publish(self, name: str, now: float) -> bool:
        """Share a heartbeat received now through Redis; False when there is none or it failed (then the
        caller persists it under the no-Redis rule)."""
        redis = self.redis
        if redis is None:
            return False
        try:
            await redis.run("agent-live", lambda: redis.client.set(KEY_PREFIX + name, repr(now),
                                                                    px=max(1, int(self.ttl * 1000))))
        except RedisUnavailable:
            return False
        return True

    def persist_due(self, last_written: float, now: float) -> bool:
        """Whether a heartbeat at `now` must go to SQLite, the last one written there being `last_written`."""
        return now - last_written >= self.persist_interval

    def trusted(self) -> bool:
        """Whether this process's view of other processes' heartbeats is current: no Redis (the registry
        carries them), or a read from Redis succeeded lately."""
        return self.redis is None or time.monotonic() - self.synced_at <= max(5.0, 3 * self.sync_interval)

    async def sync(self) -> None:
        """Merge the heartbeats every process published for the agents this process knows (one MGET)."""
        redis = self.redis
        if redis is None:
            return
        names = list(self.directory.agents)
        if names:
            values = await redis.run("agent-live", lambda: redis.client.mget([KEY_PREFIX + n for n in names]))
            now = time.time()
            for name, value in zip(names, values, strict=True):
                if value is None:
                    continue
                try:
                    beat = float(value)
                except ValueError:
                    continue
                self.directory.beat(name, min(beat, now))  # a clock ahead of ours gains no extra life
        self.synced_at = time.monotonic()

    async def run(self) -> None:
        """Sync every `sync_interval` until cancelled (nothing to do without Redis)."""
        if self.redis is None:
            return
        while True:
            try:
                await self.sync()
            except RedisUnavailable:  # logged by RedisLink; the heartbeats fall back to the registry meanwhile
                pass
            except Exception:  # a bug must not stop the task
                log.exception("agent liveness sync failed")
            await asyncio.sleep(self.sync_interval)
