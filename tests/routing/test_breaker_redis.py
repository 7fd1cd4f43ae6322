"""Three breakers (three replicas) sharing ejections and cooldowns through a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis as sync_redis

from router.config import Settings
from router.observability import Metrics
from router.redis_link import RedisLink
from router.routing.breaker import EJECTIONS, SYNC_INTERVAL, Breaker, BreakerSettings
from router.routing.deployment import Deployment
from router.routing.failures import RateLimited, ServerError
from router.routing.stats import DeploymentStats

FAULT = ServerError("boom")


def link(url: str, **settings: object) -> RedisLink:
    return RedisLink(Settings(redis_url=url, **settings), Metrics())  # type: ignore[arg-type]


def dep(group: str, id: str) -> Deployment:
    """Each replica builds its own Deployment (and statistics) objects for the same deployment."""
    provider: Any = None
    return Deployment(id=id, group=group, type="openai", provider=provider, upstream_model=group, rename=None,
                      stats=DeploymentStats())


async def until(check: Callable[[], bool], within: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not within {within:.1f} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Replica:
    def __init__(self, url: str, group: str, settings: BreakerSettings, **link_settings: object) -> None:
        self.breaker = Breaker(settings)
        self.link = link(url, **link_settings)
        self.d, self.other = dep(group, "d"), dep(group, "other")

    def routes_to_d(self) -> bool:
        return self.d in self.breaker.available([self.d, self.other])

    def returns_in(self) -> float:
        return next(s.returns_in for s in self.breaker.states() if s.key.endswith("\x00d"))

    async def close(self) -> None:
        await self.breaker.stop()
        await self.link.close()


def eject(replica: Replica, times: int = 5) -> None:
    for _ in range(times):
        replica.breaker.begin(replica.d)
        replica.breaker.record_failure(replica.d, FAULT)


def test_an_ejection_on_one_replica_is_seen_by_the_others_within_a_second_and_never_shortened(
        redis_url: str) -> None:
    group = f"g-{uuid.uuid4().hex}"

    async def scenario() -> None:
        long, short = (BreakerSettings(base_ejection=30.0, jitter=0.0),
                       BreakerSettings(base_ejection=2.0, jitter=0.0))
        a, b, c = Replica(redis_url, group, long), Replica(redis_url, group, long), Replica(redis_url, group, short)
        try:
            for r in (a, b):
                await r.breaker.start(r.link)
            assert a.routes_to_d() and b.routes_to_d()
            ejected_at = time.time()
            eject(a)
            assert not a.routes_to_d()
            took = await until(lambda: not b.routes_to_d(), within=1.0)
            assert took <= 1.0
            assert b.returns_in() == pytest.approx(30.0, abs=1.0)
            assert "another replica" in next(s.reason for s in b.breaker.states())

            eject(c)  # c ejected it on its own, for 2 s, before it saw a's: that must not shorten a's 30 s
            assert c.returns_in() == pytest.approx(2.0, abs=0.1)
            await c.breaker.start(c.link)
            await asyncio.sleep(SYNC_INTERVAL * 4)
            for r in (a, b, c):
                assert r.returns_in() == pytest.approx(30.0 - (time.time() - ejected_at), abs=0.1)
            score = sync_redis.Redis.from_url(redis_url).zscore(EJECTIONS, f"{group}\x00d")
            assert score is not None and score / 1000 - ejected_at == pytest.approx(30.0, abs=0.1)
            assert b.d not in b.breaker.available([b.d, b.other])
        finally:
            for r in (a, b, c):
                await r.close()

    asyncio.run(scenario())


def test_a_cooldown_is_shared_too_and_a_longer_ejection_still_wins(redis_url: str) -> None:
    group = f"g-{uuid.uuid4().hex}"

    async def scenario() -> None:
        settings = BreakerSettings(base_ejection=20.0, jitter=0.0, retry_after_cap=30.0)
        a, b = Replica(redis_url, group, settings), Replica(redis_url, group, settings)
        try:
            for r in (a, b):
                await r.breaker.start(r.link)
            a.breaker.record_failure(a.d, RateLimited("slow down", retry_after=1.0))
            await until(lambda: not b.routes_to_d(), within=1.0)
            state = next(s for s in b.breaker.states())
            assert state.cooling and state.state == "closed"  # cooled, not ejected: no probe needed after
            await until(b.routes_to_d, within=2.0)  # the cooldown ends everywhere
            eject(b)
            await until(lambda: not a.routes_to_d(), within=1.0)
            assert a.returns_in() == pytest.approx(20.0, abs=1.0)
        finally:
            for r in (a, b):
                await r.close()

    asyncio.run(scenario())


def test_redis_down_leaves_each_replica_its_own_circuits_and_recovers(redis_server) -> None:
    group = f"g-{uuid.uuid4().hex}"

    async def scenario() -> None:
        settings = BreakerSettings(base_ejection=30.0, jitter=0.0)
        a = Replica(redis_server.url, group, settings, redis_retry_after=0.2)
        b = Replica(redis_server.url, group, settings, redis_retry_after=0.2)
        try:
            for r in (a, b):
                await r.breaker.start(r.link)
            await asyncio.sleep(SYNC_INTERVAL * 2)
            redis_server.stop()
            started = time.perf_counter()
            eject(a)  # the request path never waits on Redis
            assert time.perf_counter() - started < 0.05
            assert not a.routes_to_d() and b.routes_to_d()
            await asyncio.sleep(SYNC_INTERVAL * 3)
            assert not a.routes_to_d() and b.routes_to_d()  # each on its own
            redis_server.start()
            await until(lambda: not b.routes_to_d(), within=3.0)  # a's ejection was kept and sent once back
        finally:
            for r in (a, b):
                await r.close()

    asyncio.run(scenario())
