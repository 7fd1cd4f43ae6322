"""The process's one Redis connection pool, and whether Redis may be used now.

Redis accelerates (shared cache, limits exact across routers) but no request
depends on it: every call has a short timeout (`REDIS_TIMEOUT`), and after a
failure Redis is left alone for `REDIS_RETRY_AFTER` seconds, so a dead Redis
costs one timeout per period, not one per request. Failures are counted in
metrics and logged at most once per period; recovery is logged too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from router.config import Settings
from router.observability import Metrics

log = logging.getLogger("router.redis")
T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis was not asked (recent failure) or did not answer in time."""


class RedisLink:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.redis_url is not None
        self.client = aioredis.Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self.retry_after = settings.redis_retry_after
        self.metrics = metrics
        self.down_until = 0.0
        self.down = False
        metrics.redis_up.set(1)

    async def close(self) -> None:
        await self.client.aclose()

    async def run(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if now < self.down_until:
            raise RedisUnavailable(op)
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            self.down_until = time.monotonic() + self.retry_after
            self.metrics.redis_errors.labels(op).inc()
            self.metrics.redis_up.set(0)
            if not self.down:
                log.warning("redis unavailable (%s during %s); going on without it, next try in %.0fs",
                            exc.__class__.__name__, op, self.retry_after)
            self.down = True
            raise RedisUnavailable(op) from None
        if self.down:
            self.down = False
            self.metrics.redis_up.set(1)
            log.warning("redis is back; shared cache and limits resume")
        return result
