"""Spend limits per client key: at most `budget` USD per `budget_period` (or over the key's life), periods
counted from `budget_start`. Once spent, the key's requests get 429 `insufficient_quota` with the time the
budget resets, until it does.

Spend is counted here in memory and, with Redis, in `budget:{key}:{period start}` (INCRBYFLOAT, expiring after
its period), which every router reads before a budgeted key's request: one GET, only for keys with a budget,
so replicas refuse as soon as their shared spend reaches the budget. A request's cost is known only at its end,
so requests already under way when the budget runs out still finish (and count). At start, each budgeted key's
spend in its current period is read from the request log (off the event loop), so a restart forgets nothing;
with Redis, only where Redis has no count yet. Without Redis, several workers each count their own requests.
A request whose cost is unknown (an unpriced deployment) spends nothing: the request log shows it unpriced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from router.auth import Client
from router.config import Settings
from router.errors import RouterError
from router.redis_link import RedisLink, RedisUnavailable
from router.registry import ClientKey

log = logging.getLogger("router.budgets")
EXPIRY_MARGIN = 3600  # seconds a period's Redis count outlives the period


def period_of(key: ClientKey, now: float) -> tuple[float, float | None]:
    """(start, end) of the key's current budget period; end None for a budget over the key's life."""
    start = key.budget_start if key.budget_start is not None else key.created_at
    period = key.budget_period
    if period is None or now < start:
        return start, None if period is None else start + period
    begun = start + math.floor((now - start) / period) * period
    return begun, begun + period


def _redis_key(name: str, start: float) -> str:
    return f"budget:{name}:{int(start)}"


class Budgets:
    def __init__(self, settings: Settings, redis: RedisLink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.clock = clock
        self.spent: dict[str, tuple[float, float]] = {}  # key name -> (period start, USD spent in it)
        self._tasks: set[asyncio.Task[None]] = set()

    def spent_now(self, key: ClientKey, now: float | None = None) -> float:
        start, _ = period_of(key, self.clock() if now is None else now)
        known = self.spent.get(key.name)
        return known[1] if known is not None and known[0] == start else 0.0

    async def check(self, client: Client) -> None:
        """429 `insufficient_quota` once the client's key spent its budget in the current period."""
        key = client.key
        if key is None or key.budget is None:
            return
        now = self.clock()
        start, end = period_of(key, now)
        spent = self.spent_now(key, now)
        if self.redis is not None and spent < key.budget:
            with contextlib.suppress(RedisUnavailable):
                redis = self.redis
                shared = await redis.run("budget", lambda: redis.client.get(_redis_key(key.name, start)))
                if shared is not None:
                    spent = max(spent, float(shared))
        if spent >= key.budget:
            raise exhausted(key, spent, end, now)

    def charge(self, key: ClientKey, cost: float) -> None:
        """Add a finished request's cost to its key's period (and to Redis, in the background)."""
        if key.budget is None or cost <= 0:
            return
        start, end = period_of(key, self.clock())
        known = self.spent.get(key.name)
        self.spent[key.name] = (start, (known[1] if known is not None and known[0] == start else 0.0) + cost)
        if self.redis is not None:
            task = asyncio.get_running_loop().create_task(self._add(key.name, start, end, cost))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _add(self, name: str, start: float, end: float | None, cost: float) -> None:
        redis = self.redis
        assert redis is not None
        rkey = _redis_key(name, start)
        ttl = int((end - self.clock()) + EXPIRY_MARGIN) if end is not None else None

        async def add() -> None:
            async with redis.client.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(rkey, cost)
                if ttl is not None:
                    pipe.expire(rkey, max(ttl, 1))
                await pipe.execute()

        with contextlib.suppress(RedisUnavailable):
            await redis.run("budget", add)

    async def seed(self, keys: Iterable[ClientKey], read_spend: Callable[[dict[str, float]], dict[str, float]]) -> None:
        """Each budgeted key's spend in its current period, from the request log (`read_spend`, run in a
        thread); with Redis, set where Redis has no count yet."""
        now = self.clock()
        starts = {k.name: period_of(k, now)[0] for k in keys if k.budget is not None and k.revoked_at is None}
        if not starts:
            return
        spent = await asyncio.to_thread(read_spend, starts)
        for name, amount in spent.items():
            known = self.spent.get(name)
            if known is None or known[0] != starts[name] or known[1] < amount:
                self.spent[name] = (starts[name], amount)
            if self.redis is not None and amount > 0:
                await self._seed_redis(self.redis, _redis_key(name, starts[name]), amount)

    @staticmethod
    async def _seed_redis(redis: RedisLink, rkey: str, amount: float) -> None:
        with contextlib.suppress(RedisUnavailable):
            await redis.run("budget", lambda: redis.client.set(rkey, amount, nx=True, ex=86400 * 400))

    async def stop(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 1)


def exhausted(key: ClientKey, spent: float, end: float | None, now: float) -> RouterError:
    if end is None:
        when, headers = "it does not reset (a budget for the key's life)", {}
    else:
        reset = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        when = f"it resets at {reset}"
        headers = {"Retry-After": str(max(1, math.ceil(end - now))), "x-ratelimit-reset-budget": reset}
    return RouterError(429, f"The API key '{key.name}' has spent its budget of ${key.budget:.2f} "
                       f"(${spent:.4f} spent); {when}.", code="insufficient_quota", type="insufficient_quota",
                       headers=headers)
