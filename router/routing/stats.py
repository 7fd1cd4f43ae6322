"""Per-deployment statistics: requests in flight and peak-EWMA latency estimates, shared through Redis.

`DeploymentStats` is touched on the request path (begin, first_byte, end: a few float operations, no I/O).
A latency estimate is a *peak* EWMA: a sample above the estimate replaces it at once (a slowing deployment
is avoided at once), a sample below pulls it down with weight 1 - exp(-dt / TAU), dt being the time since the
previous sample (a recovering one wins its traffic back over tens of seconds). Streams and non-streams have
separate estimates: time to first byte for streams, the whole exchange for non-streams.

With Redis, `StatsRegistry` runs one task that every `PUBLISH_INTERVAL` writes this process's in-flight counts
and estimates as one value with a short TTL, and reads every other process's value: their in-flight counts are
summed into `remote_in_flight`, their estimates merged into ours (a mean weighted by samples, capped). The
request path never waits on Redis; when Redis fails, the remote values are dropped once they are older than
the TTL and each process goes on with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from router.redis_link import RedisLink

log = logging.getLogger("router.stats")

TAU = 10.0  # seconds: time constant of the decay towards lower samples
MIN_SAMPLES = 1  # an estimate is None below this many samples (this process's and other replicas' together)
STALE_AFTER = 60.0  # seconds without a sample after which an estimate is stale (strategies probe it again)
WEIGHT_CAP = 16  # samples that count when merging replicas' estimates: a long-lived replica does not drown
#                  a fresh view
FORGET_AFTER = 900.0  # seconds a key no table asked for and nothing used stays held (then only weakly)
PUBLISH_INTERVAL = 0.25  # seconds between two exchanges with Redis
STATE_TTL = 2.0  # seconds a process's published state outlives its last write
KEY_PREFIX = "router:stats:"
PROCESSES = "router:stats:processes"  # a set of the process ids that published

#: other replicas' view of one estimate, merged: (mean, weight, samples, fresh); weight 0: none
RemoteEstimate = tuple[float, int, int, bool]
NO_REMOTE: RemoteEstimate = (0.0, 0, 0, False)


class Estimate:
    """One peak-EWMA latency estimate (seconds)."""

    __slots__ = ("value", "samples", "stamp")

    def __init__(self) -> None:
        self.value = 0.0
        self.samples = 0
        self.stamp = -math.inf  # time of the last sample

    def observe(self, sample: float, now: float) -> None:
        if self.samples == 0 or sample >= self.value:
            self.value = sample
        else:
            keep = math.exp(-max(0.0, now - self.stamp) / TAU)
            self.value = self.value * keep + sample * (1.0 - keep)
        self.samples += 1
        self.stamp = now

    def raise_to(self, sample: float, now: float) -> None:
        """A failure's duration: counted only when it makes the deployment look slower, never faster."""
        if self.samples and sample > self.value:
            self.observe(sample, now)


class DeploymentStats:
    """One deployment's counters in this process, plus what other replicas reported for it."""

    __slots__ = ("in_flight", "remote_in_flight", "negative_ends", "ttft", "latency", "remote_ttft",
                 "remote_latency", "seen", "__weakref__")

    def __init__(self) -> None:
        self.in_flight = 0  # requests of this process being answered by the deployment
        self.remote_in_flight = 0  # the sum over other replicas (Redis), refreshed every PUBLISH_INTERVAL
        self.negative_ends = 0  # end() calls without a begin(): clamped at 0 and counted
        self.ttft = Estimate()  # streams: seconds to the first byte
        self.latency = Estimate()  # non-streams: seconds for the whole exchange
        self.remote_ttft = NO_REMOTE  # other replicas' estimates, merged (refreshed with remote_in_flight)
        self.remote_latency = NO_REMOTE
        self.seen = 0.0  # last time a route table asked for it or a request ended (registry clock)

    def load(self) -> int:
        return self.in_flight + self.remote_in_flight

    def begin(self) -> None:
        self.in_flight += 1

    def first_byte(self, seconds: float, now: float) -> None:
        self.ttft.observe(seconds, now)

    def end(self, seconds: float, now: float, ok: bool, stream: bool) -> None:
        """The attempt is over. A non-stream's duration feeds its estimate (a failure only raises it);
        a stream's estimate is fed by first_byte alone, as a stream's length says nothing of its speed."""
        if self.in_flight > 0:
            self.in_flight -= 1
        else:
            self.negative_ends += 1
        self.seen = now
        if not stream:
            if ok:
                self.latency.observe(seconds, now)
            else:
                self.latency.raise_to(seconds, now)

    def samples(self, stream: bool) -> int:
        """Samples behind the estimate, this process's and other replicas' together."""
        return (self.ttft.samples + self.remote_ttft[2]) if stream else (self.latency.samples + self.remote_latency[2])

    def expected_latency(self, stream: bool, now: float) -> float | None:
        """Seconds (TTFT for streams, latency otherwise), unscaled by load; None with too few samples."""
        own, (mean, weight, count, _) = (self.ttft, self.remote_ttft) if stream else (self.latency,
                                                                                         self.remote_latency)
        if own.samples + count < MIN_SAMPLES:
            return None
        if not weight:
            return own.value
        w = min(own.samples, WEIGHT_CAP)
        return (own.value * w + mean * weight) / (w + weight)

    def fresh(self, stream: bool, now: float) -> bool:
        """Whether the estimate exists and some replica measured it within STALE_AFTER seconds."""
        own, remote = (self.ttft, self.remote_ttft) if stream else (self.latency, self.remote_latency)
        if own.samples + remote[2] < MIN_SAMPLES:
            return False
        return now - own.stamp < STALE_AFTER or remote[3]

    def snapshot(self, now: float) -> list[float]:
        """What other replicas read: in flight, then per estimate its value, samples and age in seconds."""
        t, n = self.ttft, self.latency
        return [self.in_flight, t.value, t.samples, min(now - t.stamp, 1e9), n.value, n.samples,
                min(now - n.stamp, 1e9)]


class StatsRegistry:
    """Every `DeploymentStats` of this process by key (f"{group}\\x00{deployment id}"), shared via Redis."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.process = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        #: every object some route table still holds; `_held` keeps recent ones alive between tables
        self._all: weakref.WeakValueDictionary[str, DeploymentStats] = weakref.WeakValueDictionary()
        self._held: dict[str, DeploymentStats] = {}
        self._last_sweep = clock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._redis: RedisLink | None = None
        self._remote_at = -math.inf  # when the other replicas were last read

    def get(self, key: str) -> DeploymentStats:
        """The same object for the same key as long as a route table holds it or it was used recently."""
        now = self.clock()
        stats = self._all.get(key)
        if stats is None:
            stats = self._all[key] = DeploymentStats()
        stats.seen = max(stats.seen, now)
        self._held[key] = stats
        if now - self._last_sweep > FORGET_AFTER / 4:
            self.sweep(now)
        return stats

    def sweep(self, now: float) -> None:
        """Let go of idle keys not asked for within FORGET_AFTER (collected once no table holds them)."""
        self._last_sweep = now
        for key in [k for k, s in self._held.items() if s.in_flight == 0 and now - s.seen > FORGET_AFTER]:
            del self._held[key]

    def items(self) -> list[tuple[str, DeploymentStats]]:
        return list(self._all.items())

    # -- sharing through Redis -------------------------------------------------------

    async def start(self, redis: RedisLink | None) -> None:
        """With Redis, publish and read every PUBLISH_INTERVAL in a background task; without, nothing."""
        if redis is None or self._task is not None:
            return
        self._redis = redis
        self._task = asyncio.create_task(self._run(), name="stats-sharing")

    async def stop(self) -> None:
        """Stop sharing and withdraw this process's state (a crashed process's expires after STATE_TTL)."""
        task, self._task = self._task, None
        if task is None:
            return
        # the loop also checks a flag: redis-py, under Python 3.11's `wait_for`, can swallow a cancellation
        # that lands mid-call (seen with the breaker's loop), and stopping must not hang on it
        self._stopping = True
        task.cancel()
        await asyncio.wait({task}, timeout=2 * PUBLISH_INTERVAL + 1.0)
        redis = self._redis
        assert redis is not None
        with contextlib.suppress(Exception):
            await redis.run("stats", lambda: redis.client.delete(KEY_PREFIX + self.process))
            await redis.run("stats", lambda: redis.client.srem(PROCESSES, self.process))

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.exchange()
            except asyncio.CancelledError:
                raise
            except Exception:  # a Redis failure (logged by RedisLink) or bad data: local values stay in charge
                log.debug("stats exchange failed", exc_info=True)
            if self.clock() - self._remote_at > STATE_TTL:
                self._apply({})  # the others' state is older than it may live: forget it
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def exchange(self) -> None:
        """Write this process's state, read the others' and apply them (two Redis round trips)."""
        redis = self._redis
        assert redis is not None
        now = self.clock()
        if now - self._last_sweep > FORGET_AFTER / 4:
            self.sweep(now)
        blob = orjson.dumps({k: s.snapshot(now) for k, s in self.items()
                             if s.in_flight or s.ttft.samples or s.latency.samples})
        mine = self.process

        async def publish() -> list[object]:
            async with redis.client.pipeline(transaction=False) as pipe:
                pipe.set(KEY_PREFIX + mine, blob, px=int(STATE_TTL * 1000))
                pipe.sadd(PROCESSES, mine)
                pipe.pexpire(PROCESSES, int(STATE_TTL * 30_000))
                pipe.smembers(PROCESSES)
                return await pipe.execute()

        members = (await redis.run("stats", publish))[3]
        assert isinstance(members, set)
        others = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        others = [o for o in others if o != mine]
        values: list[bytes | str | None] = []
        if others:
            values = await redis.run("stats", lambda: redis.client.mget([KEY_PREFIX + o for o in others]))
            gone = [o for o, v in zip(others, values, strict=True) if v is None]
            if gone:
                await redis.run("stats", lambda: redis.client.srem(PROCESSES, *gone))
        states: list[Mapping[str, object]] = []
        for value in values:
            if value is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    if isinstance(state := orjson.loads(value), dict):
                        states.append(state)
        self._remote_at = self.clock()
        self._apply(merge(states))

    def _apply(self, merged: dict[str, tuple[int, RemoteEstimate, RemoteEstimate]]) -> None:
        none = (0, NO_REMOTE, NO_REMOTE)
        for key, stats in self.items():
            stats.remote_in_flight, stats.remote_ttft, stats.remote_latency = merged.get(key, none)


def merge(states: Sequence[Mapping[str, object]]) -> dict[str, tuple[int, RemoteEstimate, RemoteEstimate]]:
    """Other replicas' states -> per key (in-flight sum, merged TTFT and latency estimates). An estimate's
    weight is its sample count capped at WEIGHT_CAP; one older than STALE_AFTER is left out. Malformed
    entries are skipped.

    A weighted mean rather than the max: with the max, one replica's peak would steer every replica away
    from a deployment, and none would then send it the traffic that shows it recovered. Each replica's own
    estimate is already peak-sensitive; the mean pools their samples."""
    acc: dict[str, list[float]] = {}
    for state in states:
        for key, entry in state.items():
            if not (isinstance(entry, list) and len(entry) == 7 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in entry)):
                continue
            a = acc.setdefault(key, [0.0] * 9)  # in flight; per estimate: sum, weight, samples, fresh
            a[0] += entry[0]
            for base, (value, samples, age) in ((1, entry[1:4]), (5, entry[4:7])):
                if samples and age < STALE_AFTER:
                    w = min(samples, WEIGHT_CAP)
                    a[base] += value * w
                    a[base + 1] += w
                    a[base + 2] += samples
                    a[base + 3] = 1.0
    return {key: (int(a[0]), (a[1] / a[2] if a[2] else 0.0, int(a[2]), int(a[3]), bool(a[4])),
                  (a[5] / a[6] if a[6] else 0.0, int(a[6]), int(a[7]), bool(a[8]))) for key, a in acc.items()}
