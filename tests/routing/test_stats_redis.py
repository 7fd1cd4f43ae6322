"""StatsRegistry replicas sharing in-flight counts and estimates through a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from router.config import Settings
from router.observability import Metrics
from router.redis_link import RedisLink
from router.routing.stats import MIN_SAMPLES, STATE_TTL, StatsRegistry

ROOT = Path(__file__).resolve().parents[2]

# another router process: a registry with 3 requests in flight on KEY and MIN_SAMPLES stream samples of 2 s
REPLICA = """
import asyncio, sys, time
import pytest

from router.config import Settings
from router.observability import Metrics
from router.redis_link import RedisLink
from router.routing.stats import MIN_SAMPLES, StatsRegistry

async def main():
    registry = StatsRegistry()
    stats = registry.get("g\\x00" + sys.argv[2])
    for t in range(MIN_SAMPLES):
        stats.first_byte(2.0, time.monotonic())
    for _ in range(3):
        stats.begin()
    await registry.start(RedisLink(Settings(redis_url=sys.argv[1]), Metrics()))
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def link(url: str, **settings: object) -> RedisLink:
    return RedisLink(Settings(redis_url=url, **settings), Metrics())  # type: ignore[arg-type]


async def until(check: Callable[[], bool], within: float) -> float:
    """Seconds it took `check` to hold (polled every 20 ms); fails after `within`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not within {within:.1f} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_two_registries_see_each_others_in_flight_within_a_second(redis_url: str) -> None:
    key = f"g\x00{uuid.uuid4().hex}"

    async def scenario() -> None:
        a, b = StatsRegistry(), StatsRegistry()
        link_a, link_b = link(redis_url), link(redis_url)
        await a.start(link_a)
        await b.start(link_b)
        try:
            sa, sb = a.get(key), b.get(key)
            for _ in range(2):
                sa.begin()
            sb.begin()
            await until(lambda: sb.remote_in_flight == 2 and sa.remote_in_flight == 1, within=1.0)
            assert sa.load() == sb.load() == 3
            sa.end(0.1, time.monotonic(), ok=True, stream=False)
            await until(lambda: sb.remote_in_flight == 1, within=1.0)
            await b.stop()  # a clean stop withdraws b's state at once
            await until(lambda: sa.remote_in_flight == 0, within=1.0)
        finally:
            await a.stop()
            await b.stop()
            await link_a.close()
            await link_b.close()

    asyncio.run(scenario())


def test_a_killed_replicas_counts_expire_and_its_estimates_are_shared(redis_url: str) -> None:
    deployment = uuid.uuid4().hex
    key = f"g\x00{deployment}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replica = subprocess.Popen([sys.executable, "-c", REPLICA, redis_url, deployment], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    async def scenario() -> None:
        registry, redis = StatsRegistry(), link(redis_url)
        stats = registry.get(key)
        stats.first_byte(1.0, time.monotonic())  # one local sample: no estimate alone
        await registry.start(redis)
        try:
            await until(lambda: stats.remote_in_flight == 3, within=1.5)
            assert stats.samples(True) == MIN_SAMPLES + 1
            estimate = stats.expected_latency(True, time.monotonic())
            assert estimate is not None and 1.0 < estimate < 2.0  # merged: 1 s (1 sample), 2 s (3 samples)
            replica.send_signal(signal.SIGKILL)  # no goodbye: its state must expire
            replica.wait(5)
            took = await until(lambda: stats.remote_in_flight == 0, within=STATE_TTL + 1.0)
            assert took > 0.5  # it expired; it was not withdrawn
            # back to its own one sample of 1 s
            assert stats.samples(True) == 1
            assert stats.expected_latency(True, time.monotonic()) == pytest.approx(1.0)
        finally:
            await registry.stop()
            await redis.close()

    try:
        assert replica.stdout is not None and replica.stdout.readline().strip() == "ready"
        asyncio.run(scenario())
    finally:
        replica.kill()
        replica.wait(5)


def test_a_redis_failure_leaves_local_values_in_charge(redis_server) -> None:
    key = f"g\x00{uuid.uuid4().hex}"

    async def scenario() -> None:
        a, b = StatsRegistry(), StatsRegistry()
        link_a, link_b = link(redis_server.url, redis_retry_after=0.2), link(redis_server.url, redis_retry_after=0.2)
        await a.start(link_a)
        await b.start(link_b)
        try:
            sa, sb = a.get(key), b.get(key)
            sa.begin()
            sb.begin()
            await until(lambda: sa.remote_in_flight == 1, within=1.0)
            redis_server.stop()
            sa.begin()  # the request path does not touch Redis: counting goes on
            assert sa.in_flight == 2
            await until(lambda: sa.remote_in_flight == 0, within=STATE_TTL + 1.0)  # stale remote: dropped
            assert sa.load() == 2
            redis_server.start()
            await until(lambda: sa.remote_in_flight == 1, within=2.0)  # back: shared again
        finally:
            await a.stop()
            await b.stop()
            await link_a.close()
            await link_b.close()

    asyncio.run(scenario())
