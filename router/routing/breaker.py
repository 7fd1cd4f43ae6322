"""Circuit breaking per deployment: which deployments may take a request now.

A deployment is *ejected* after `failures` consecutive deployment faults, or when more than `failure_rate` of
at least `min_requests` requests within the last `window` seconds failed. The k-th ejection in a row lasts
`base_ejection` × 2^(k−1) seconds, capped at `max_ejection`, shortened by up to `jitter` of itself at random
(so replicas that ejected together do not probe together). After it the circuit is *half-open*: one request
at a time is let through as a probe; its success closes the circuit (k back to 0), its failure ejects again
with k+1. A busy deployment (429, overloaded: `UpstreamFailure.cools`) is only *cooled* for its
`Retry-After` (capped at `retry_after_cap`): kept out that long, not counted as a failure, no probe after.
`available()` never leaves a group with nothing: when every deployment is out, the one that failed least
recently is offered.

The request path reads one deadline per deployment (`Circuit.until <= now`), from a dict keyed by the
deployment's `DeploymentStats` (one object per group and deployment id across route-table rebuilds); a
deployment that never failed has no circuit at all, and a group none of whose deployments failed costs one
truth test. Recording an outcome is a few attribute updates; no I/O.

With Redis, a background task (`start`) every `SYNC_INTERVAL` publishes this process's new ejections and
cooldowns (deployment key -> wall-clock deadline, reason) through one Lua script that keeps the later of the
stored and the new deadline (a new ejection never shortens one), and reads every replica's: a deployment
ejected anywhere is kept out everywhere within `SYNC_INTERVAL` plus one round trip, and probed by each replica
when its deadline passes. Redis down: each process goes on with its own circuits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from router.redis_link import RedisLink
    from router.routing.deployment import Deployment
    from router.routing.failures import UpstreamFailure

log = logging.getLogger("router.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
BUCKETS = 10  # the failure-rate window is kept as this many buckets of window / BUCKETS seconds
SYNC_INTERVAL = 0.25  # seconds between two exchanges with Redis
SWEEP_INTERVAL = 30.0  # seconds between two clean-ups of circuits that have nothing left to say
EJECTIONS = "router:breaker:ejections"  # sorted set: deployment key -> wall-clock deadline (ms)
COOLDOWNS = "router:breaker:cooldowns"
REASONS = ":reasons"  # a hash beside each sorted set: deployment key -> reason
KEEP_EXPIRED_MS = 60_000  # expired entries are removed from Redis this long after their deadline
_SAME = 0.01  # seconds: a deadline read back from Redis this close to ours is ours (clock reads, ms rounding)

#: KEYS: sorted set, its reasons hash; ARGV: member, deadline (ms), reason. Keeps the later deadline.
_EXTEND = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
#: KEYS: sorted set, its reasons hash; ARGV: remove what expired before this (ms)
_SWEEP = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return #gone
"""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 5  # consecutive deployment faults that eject (ROUTER_BREAKER_FAILURES)
    failure_rate: float = 0.5  # a failure share above this ejects ... (ROUTER_BREAKER_FAILURE_RATE)
    min_requests: int = 20  # ... over at least this many requests (ROUTER_BREAKER_MIN_REQUESTS)
    window: float = 30.0  # ... within this many seconds (ROUTER_BREAKER_WINDOW)
    base_ejection: float = 5.0  # seconds of the first ejection in a row (ROUTER_BREAKER_BASE_EJECTION)
    max_ejection: float = 300.0  # the longest ejection (ROUTER_BREAKER_MAX_EJECTION)
    retry_after_cap: float = 30.0  # the longest Retry-After honoured (ROUTER_RETRY_AFTER_CAP)
    jitter: float = 0.2  # an ejection is shortened by up to this share of itself, at random
    probe_timeout: float = 60.0  # a probe that has not reported within this long lets another through

    @classmethod
    def from_settings(cls, settings: object) -> BreakerSettings:
        """From `Settings` (`router_breaker_*`, `router_retry_after_cap`); a setting not there keeps its default."""
        default = cls()
        names = {"failures": "router_breaker_failures", "failure_rate": "router_breaker_failure_rate",
                 "min_requests": "router_breaker_min_requests", "window": "router_breaker_window",
                 "base_ejection": "router_breaker_base_ejection", "max_ejection": "router_breaker_max_ejection",
                 "retry_after_cap": "router_retry_after_cap"}
        return cls(**{field: getattr(settings, name, getattr(default, field)) for field, name in names.items()})


class Circuit:
    """One deployment's breaker. `until` is all the request path reads: the deployment may take a request
    when `until <= now` (closed; cooled or ejected until then; half-open with its probe taken until the probe
    reports or times out)."""

    __slots__ = ("key", "until", "ejected_until", "cooled_until", "open", "probing", "consecutive", "ejections",
                 "last_failure", "reason", "counts", "stamps", "total_ejections", "total_failures")

    def __init__(self, key: str) -> None:
        self.key = key
        self.until = -math.inf
        self.ejected_until = -math.inf
        self.cooled_until = -math.inf
        self.open = False  # ejected (or half-open): a probe must succeed before it closes
        self.probing = False  # a probe is in flight
        self.consecutive = 0  # deployment faults in a row
        self.ejections = 0  # k: ejections in a row (reset when a probe succeeds)
        self.last_failure = -math.inf
        self.reason = ""
        self.counts = [0] * (2 * BUCKETS)  # per bucket: requests, failures
        self.stamps = [-1] * BUCKETS  # the bucket number each slot holds
        self.total_ejections = 0
        self.total_failures = 0

    def state(self, now: float) -> str:
        if not self.open:
            return CLOSED
        return OPEN if now < self.ejected_until else HALF_OPEN

    def _count(self, now: float, width: float, failed: bool) -> None:
        number = int(now // width)
        slot = number % BUCKETS
        if self.stamps[slot] != number:
            self.stamps[slot] = number
            self.counts[2 * slot] = self.counts[2 * slot + 1] = 0
        self.counts[2 * slot] += 1
        if failed:
            self.counts[2 * slot + 1] += 1

    def window(self, now: float, width: float) -> tuple[int, int]:
        """(requests, failures) within the window ending now."""
        oldest = int(now // width) - BUCKETS + 1
        requests = failures = 0
        for slot, number in enumerate(self.stamps):
            if number >= oldest:
                requests += self.counts[2 * slot]
                failures += self.counts[2 * slot + 1]
        return requests, failures

    def _clear_window(self) -> None:
        self.stamps = [-1] * BUCKETS

    def _settle(self) -> None:
        """Recompute `until` from the deadlines (the one value the request path compares)."""
        self.until = max(self.ejected_until, self.cooled_until)


class CircuitState(NamedTuple):
    """One deployment's breaker as `/metrics` and `router health` show it."""

    key: str  # f"{group}\\x00{deployment id}"
    state: str  # closed, open, half-open
    cooling: bool  # kept out by a Retry-After
    consecutive_failures: int
    window_requests: int
    window_failures: int
    ejections: int  # k: ejections in a row
    total_ejections: int
    total_failures: int
    returns_in: float  # seconds until it may take requests again (0: now)
    reason: str


class Breaker:
    """Every deployment's circuit in this process, shared with other replicas through Redis."""

    def __init__(self, settings: BreakerSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, wall: Callable[[], float] = time.time) -> None:
        self.settings = settings or BreakerSettings()
        self.clock = clock
        self.wall = wall  # wall-clock seconds: deadlines shared between machines are wall-clock
        self.rng = rng or random.Random()
        self._width = self.settings.window / BUCKETS
        self._circuits: dict[object, Circuit] = {}  # by the deployment's DeploymentStats
        self._by_key: dict[str, Circuit] = {}
        #: remote deadlines for deployments with no circuit here yet: key -> {ejection?: (deadline, reason)}
        self._pending: dict[str, dict[bool, tuple[float, str]]] = {}
        #: deadlines to publish: (ejection?, key) -> (wall-clock deadline, reason); None: no Redis to publish to
        self._outbox: dict[tuple[bool, str], tuple[float, str]] | None = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._redis: RedisLink | None = None
        self._last_sweep = -math.inf  # the first sync round sweeps (nothing to sweep yet)
        self.on_eject: Callable[[str, str], None] | None = None  # (key, reason): for metrics and logs

    # -- the request path -------------------------------------------------------------

    def available(self, deployments: Sequence[Deployment], now: float | None = None) -> Sequence[Deployment]:
        """The deployments that may take a request now; `deployments` itself when all may. Never empty for a
        non-empty input: if every one is out, the one whose last failure is oldest. Call it right before
        choosing, and `begin` on the choice, with no await in between (a half-open deployment's probe is
        claimed there)."""
        if not self._circuits and not self._pending:
            return deployments
        if now is None:
            now = self.clock()
        circuits = self._circuits
        out: list[Deployment] | None = None
        for i, d in enumerate(deployments):
            c = circuits.get(d.stats)
            if c is None and self._pending:
                c = self._bind(d)
            if c is None or c.until <= now:
                if out is not None:
                    out.append(d)
            elif out is None:
                out = list(deployments[:i])
        if out is None:
            return deployments
        if out or not deployments:
            return out
        return [min(deployments, key=lambda d: circuits[d.stats].last_failure)]

    def begin(self, d: Deployment, now: float | None = None) -> bool:
        """An attempt at `d` starts. Returns True when it is the half-open deployment's probe."""
        c = self._circuits.get(d.stats)
        if c is None or not c.open:
            return False
        if now is None:
            now = self.clock()
        if now < c.ejected_until or (c.probing and now < c.until):
            return False  # offered although out (all were), or another probe is still out there
        c.probing = True
        c.until = max(now + self.settings.probe_timeout, c.cooled_until)
        return True

    def record_success(self, d: Deployment, now: float | None = None) -> None:
        """`d` answered (a stream: its first content arrived; a client's own error counts: it answered). When
        half-open, that closes the circuit."""
        c = self._circuits.get(d.stats)
        if c is None:
            return  # never failed: nothing to keep
        if now is None:
            now = self.clock()
        c._count(now, self._width, False)
        c.consecutive = 0
        if c.open and now >= c.ejected_until:  # half-open: the probe (or a request from before) answered
            c.open = c.probing = False
            c.ejections = 0
            c.ejected_until = -math.inf
            c.reason = ""
            c._settle()

    def record_failure(self, d: Deployment, failure: UpstreamFailure, now: float | None = None) -> None:
        """An attempt at `d` failed with `failure`: a busy deployment cools, a deployment fault counts
        towards ejection (a probe's ejects again at once), the client's own mistakes count as answers."""
        if not failure.deployment_fault and not failure.cools:
            self.record_success(d, now)
            return
        if now is None:
            now = self.clock()
        c = self._circuits.get(d.stats)
        if c is None:
            c = self._circuits[d.stats] = self._by_key[_key(d)] = Circuit(_key(d))
        if failure.cools:
            seconds = failure.cooldown(self.settings.retry_after_cap) or 0.0
            if now + seconds > c.cooled_until:
                c.cooled_until = now + seconds
                self._publish(False, c, c.cooled_until, f"{failure.kind}: cooling {seconds:g} s", now)
            if c.probing:  # it answered, busy: not a verdict; the next request may probe
                c.probing = False
                c.until = -math.inf
            c._settle()
            return
        c.consecutive += 1
        c.total_failures += 1
        c.last_failure = now
        c._count(now, self._width, True)
        reason = f"{failure.kind}: {failure.message[:200]}"
        if c.open:
            if now >= c.ejected_until:  # half-open: the probe failed; out again, for longer
                self._eject(c, now, f"probe failed ({reason})")
            return  # still out (offered because every deployment was): no new verdict
        s = self.settings
        if c.consecutive >= s.failures:
            self._eject(c, now, f"{c.consecutive} consecutive failures, last {reason}")
            return
        requests, failures = c.window(now, self._width)
        if requests >= s.min_requests and failures > s.failure_rate * requests:
            self._eject(c, now, f"{failures} of {requests} requests failed in {s.window:g} s, last {reason}")

    def release(self, d: Deployment) -> None:
        """An attempt ended with no verdict (the client left, the request was cancelled): its probe is free."""
        c = self._circuits.get(d.stats)
        if c is not None and c.probing:
            c.probing = False
            c._settle()

    def _eject(self, c: Circuit, now: float, reason: str) -> None:
        s = self.settings
        c.ejections += 1
        c.total_ejections += 1
        seconds = min(s.max_ejection, s.base_ejection * 2 ** (c.ejections - 1))
        seconds *= 1.0 - s.jitter * self.rng.random()
        c.open, c.probing = True, False
        c.ejected_until = max(c.ejected_until, now + seconds)
        c.consecutive = 0
        c.reason = reason
        c._clear_window()
        c._settle()
        self._publish(True, c, c.ejected_until, reason, now)
        log.warning("deployment %s ejected for %.1f s (ejection %d in a row): %s", c.key.replace("\x00", "/"),
                    seconds, c.ejections, reason)
        if self.on_eject is not None:
            self.on_eject(c.key, reason)

    def _bind(self, d: Deployment) -> Circuit | None:
        """A circuit for `d` if another replica has a deadline for it (rare: only while `_pending` holds some)."""
        key = _key(d)
        pending = self._pending.pop(key, None)
        if pending is None:
            return None
        c = self._circuits[d.stats] = self._by_key[key] = Circuit(key)
        for ejection, (deadline, reason) in pending.items():
            self._apply(c, ejection, deadline, reason)
        return c

    # -- what /metrics and `router health` show ---------------------------------------------

    def states(self, now: float | None = None) -> list[CircuitState]:
        if now is None:
            now = self.clock()
        out = []
        for c in list(self._by_key.values()):
            requests, failures = c.window(now, self._width)
            out.append(CircuitState(c.key, c.state(now), now < c.cooled_until, c.consecutive, requests, failures,
                                    c.ejections, c.total_ejections, c.total_failures, max(0.0, c.until - now)
                                    if c.until != math.inf else 0.0, c.reason))
        return out

    def sweep(self, now: float | None = None) -> None:
        """Forget circuits with nothing left to say (closed, not cooling, no failure within the window)."""
        if now is None:
            now = self.clock()
        self._last_sweep = now
        idle = [stats for stats, c in self._circuits.items()
                if not c.open and c.until <= now and now - c.last_failure > self.settings.window
                and not c.probing]
        for stats in idle:
            c = self._circuits.pop(stats)
            if self._by_key.get(c.key) is c:
                del self._by_key[c.key]
        self._pending = {k: v for k, v in self._pending.items() if max(d for d, _ in v.values()) > now}

    # -- sharing through Redis ---------------------------------------------------------

    def _publish(self, ejection: bool, c: Circuit, deadline: float, reason: str, now: float) -> None:
        """Queue a deadline for the next exchange (kept from the start, so what happened before the first
        exchange is shared too; at most one entry per deployment and kind)."""
        if self._outbox is not None:
            self._outbox[(ejection, c.key)] = (self.wall() + (deadline - now), reason)

    def _apply(self, c: Circuit, ejection: bool, deadline: float, reason: str) -> None:
        """Another replica's deadline (local clock): it only ever extends this one's."""
        if ejection:
            if deadline > c.ejected_until + _SAME:
                c.ejected_until = deadline
                c.open = True
                c.reason = f"ejected by another replica: {reason}"
        elif deadline > c.cooled_until + _SAME:
            c.cooled_until = deadline
        if c.probing and deadline > c.until:
            c.probing = False
        c._settle()

    async def start(self, redis: RedisLink | None) -> None:
        """With Redis, exchange deadlines every SYNC_INTERVAL in a background task; without, nothing."""
        if redis is None:
            self._outbox = None  # nothing will ever read it
            return
        if self._task is not None:
            return
        self._redis = redis
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="breaker-sharing")

    async def stop(self) -> None:
        """Stop sharing. The loop also checks a flag: redis-py, under Python 3.11's `wait_for`, can swallow a
        cancellation that lands mid-call (seen here), and the task must end all the same."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            task.cancel()
            await asyncio.wait({task}, timeout=2 * SYNC_INTERVAL + 1.0)

    async def _run(self) -> None:
        last_redis_sweep = -math.inf
        while not self._stopping:
            sweep = self.clock() - last_redis_sweep > SWEEP_INTERVAL
            if sweep:
                last_redis_sweep = self.clock()
            try:
                await self.exchange(sweep)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis failing (RedisLink logs it) or bad data: local circuits stay in charge
                log.debug("breaker exchange failed", exc_info=True)
            if self.clock() - self._last_sweep > SWEEP_INTERVAL:
                self.sweep()
            await asyncio.sleep(SYNC_INTERVAL)

    async def exchange(self, sweep: bool = False) -> None:
        """Publish this process's new deadlines, read everyone's and apply them (one pipelined round trip)."""
        redis = self._redis
        assert redis is not None and self._outbox is not None
        outbox, self._outbox = self._outbox, {}
        now_ms = int(self.wall() * 1000)

        async def exchange() -> list[Any]:
            async with redis.client.pipeline(transaction=False) as pipe:
                for (ejection, key), (deadline, reason) in outbox.items():
                    zset = EJECTIONS if ejection else COOLDOWNS
                    pipe.eval(_EXTEND, 2, zset, zset + REASONS, key, int(deadline * 1000), reason)
                if sweep:
                    for zset in (EJECTIONS, COOLDOWNS):
                        pipe.eval(_SWEEP, 2, zset, zset + REASONS, now_ms - KEEP_EXPIRED_MS)
                for zset in (EJECTIONS, COOLDOWNS):
                    pipe.zrangebyscore(zset, f"({now_ms}", "+inf", withscores=True)
                    pipe.hgetall(zset + REASONS)
                return await pipe.execute()

        try:
            results = await redis.run("breaker", exchange)
        except BaseException:
            for item, value in outbox.items():  # sent again next time (a newer deadline wins)
                if item not in self._outbox or self._outbox[item][0] < value[0]:
                    self._outbox[item] = value
            raise
        now, wall = self.clock(), self.wall()
        for ejection, (entries, reasons) in ((True, results[-4:-2]), (False, results[-2:])):
            for member, score in entries:
                key = member.decode() if isinstance(member, bytes) else str(member)
                raw = reasons.get(member, b"") if isinstance(reasons, dict) else b""
                reason = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                deadline = now + (float(score) / 1000 - wall)
                c = self._by_key.get(key)
                if c is not None:
                    self._apply(c, ejection, deadline, reason)
                else:
                    known = self._pending.setdefault(key, {})
                    if ejection not in known or known[ejection][0] < deadline:
                        known[ejection] = (deadline, reason)


def _key(d: Deployment) -> str:
    """The deployment's key across replicas (the same as its statistics')."""
    return f"{d.group}\x00{d.id}"
