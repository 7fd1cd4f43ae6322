"""Rate limits: requests and tokens per minute, per client and per model.

The algorithm is GCRA (a leaky bucket with one timestamp per limit): a limit
of N per minute admits a burst of N, then one every 60/N seconds. Every limit
a request touches is checked and charged in one step, all or nothing:
- in-process by default (`LocalLimiter`);
- with `REDIS_URL`, in Redis by one Lua script on the server's clock
  (`RedisLimiter`), so N routers sharing a Redis admit exactly the limit.
  If Redis fails, `RATE_LIMIT_ON_REDIS_FAILURE` says what happens: `local`
  (per-process limits, the default), `open` (no limits) or `closed` (503).

Tokens are counted before the request, as OpenAI does: about four bytes of
request per prompt token, plus `max_tokens` (or `max_completion_tokens`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from router.auth import Client
from router.errors import RouterError
from router.observability import Metrics
from router.providers.base import ChatCall
from router.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger("router.ratelimit")
PERIOD = 60.0  # seconds: limits are per minute


@dataclass(slots=True)
class Limit:
    key: str  # storage key, e.g. "rl:key:team-a:requests"
    kind: str  # "requests" or "tokens"
    scope: str  # "client" or "model"
    rate: int  # per minute
    cost: int


@dataclass(slots=True)
class Outcome:
    allowed: bool
    remaining: int
    wait: float  # seconds until the request would be admitted (rejected only)
    reset: float  # seconds until the bucket is full again


def estimate_tokens(call: ChatCall) -> int:
    payload = call.payload
    out = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
    return len(call.body) // 4 + (out if isinstance(out, int) else 0)


def duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs_text}s" if minutes else f"{secs_text}s"


class LocalLimiter:
    """GCRA in this process's memory."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.tat: dict[str, float] = {}  # theoretical arrival time per limit key
        self.max_keys = max_keys

    def check(self, limits: list[Limit], now: float | None = None, charge: bool = True) -> list[Outcome]:
        """Each limit's outcome; the request is charged to all of them only if all admit it (and `charge`)."""
        if now is None:
            now = time.monotonic()
        outcomes: list[Outcome] = []
        updates: list[tuple[str, float]] = []
        for limit in limits:
            interval = PERIOD / limit.rate
            # distances from now, not absolute times: no precision lost to large clock values
            ahead = max(self.tat.get(limit.key, now) - now, 0.0)
            used = ahead + limit.cost * interval
            wait = used - PERIOD
            if wait > 1e-7:
                outcomes.append(Outcome(False, 0, wait, ahead))
            else:
                outcomes.append(Outcome(True, int((PERIOD - used) / interval + 1e-6), 0.0, used))
                updates.append((limit.key, now + used))
        if charge and all(o.allowed for o in outcomes):
            self.tat.update(updates)
            if len(self.tat) > self.max_keys:  # forget buckets that are full again
                self.tat = {k: v for k, v in self.tat.items() if v > now}
        return outcomes


# KEYS: one per limit. ARGV: period in ms, then rate and cost per limit.
# Returns ok, then allowed/remaining/wait_ms/reset_ms per limit. Nothing is
# written unless every limit admits the request.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[1])
local ok = 1
local out = {}
local news = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  local interval = period / rate
  local ahead = (tonumber(redis.call('GET', KEYS[i]) or now)) - now
  if ahead < 0 then ahead = 0 end
  local used = ahead + cost * interval
  local wait = used - period
  -- tolerances above the precision of millisecond epoch times (about 0.0003 ms)
  if wait > 0.001 then
    ok = 0
    out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = math.ceil(wait); out[#out + 1] = math.ceil(ahead)
  else
    out[#out + 1] = 1
    out[#out + 1] = math.floor((period - used) / interval + 0.01)
    out[#out + 1] = 0
    out[#out + 1] = math.ceil(used)
    news[i] = now + used
  end
end
if ok == 1 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], tostring(news[i]), 'PX', math.ceil(news[i] - now) + 1000)
  end
end
table.insert(out, 1, ok)
return out
"""


class RateLimiter:
    def __init__(self, default_rpm: int, default_tpm: int, metrics: Metrics, redis: RedisLink | None = None,
                 on_redis_failure: str = "local") -> None:
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.metrics = metrics
        self.local = LocalLimiter()
        self.redis = redis
        self.on_redis_failure = on_redis_failure
        self.script = redis.client.register_script(GCRA_SCRIPT) if redis is not None else None
        self.model_limits: dict[str, tuple[int | None, int | None]] = {}

    def limits_for(self, client: Client, call: ChatCall) -> list[Limit]:
        key = client.key
        rpm = key.rpm if key is not None and key.rpm else self.default_rpm
        tpm = key.tpm if key is not None and key.tpm else self.default_tpm
        limits: list[Limit] = []
        tokens = 0
        if rpm and not client.admin:
            limits.append(Limit(f"rl:{client.scope}:requests", "requests", "client", rpm, 1))
        if tpm and not client.admin:
            tokens = estimate_tokens(call)
            limits.append(Limit(f"rl:{client.scope}:tokens", "tokens", "client", tpm, tokens))
        model_rpm, model_tpm = self.model_limits.get(call.model, (None, None))
        if model_rpm:
            limits.append(Limit(f"rl:model:{call.model}:requests", "requests", "model", model_rpm, 1))
        if model_tpm:
            limits.append(Limit(f"rl:model:{call.model}:tokens", "tokens", "model", model_tpm,
                                tokens or estimate_tokens(call)))
        return limits

    async def check(self, client: Client, call: ChatCall) -> list[tuple[bytes, bytes]]:
        """Charge the request to every limit it touches; raise 429 if one is exhausted.

        Returns the x-ratelimit-* headers for the client's own limits."""
        limits = self.limits_for(client, call)
        if not limits:
            return []
        outcomes = await self._decide(limits)
        if outcomes is None:  # Redis down and RATE_LIMIT_ON_REDIS_FAILURE=open
            return []
        headers: list[tuple[bytes, bytes]] = []
        for limit, outcome in zip(limits, outcomes, strict=True):
            if limit.scope == "client":
                kind = limit.kind.encode()
                headers += [(b"x-ratelimit-limit-" + kind, str(limit.rate).encode()),
                            (b"x-ratelimit-remaining-" + kind, str(outcome.remaining).encode()),
                            (b"x-ratelimit-reset-" + kind, duration(outcome.reset).encode())]
        for limit, outcome in zip(limits, outcomes, strict=True):
            if not outcome.allowed:
                self.metrics.rate_limited.labels(limit.scope, limit.kind).inc()
                who = f"model '{call.model}'" if limit.scope == "model" else f"client '{client.label}'"
                retry = max(1, math.ceil(outcome.wait))
                raise RouterError(
                    429, f"Rate limit reached for {who}: {limit.rate} {limit.kind} per minute. "
                         f"Please try again in {duration(outcome.wait)}.",
                    code="rate_limit_exceeded", type=limit.kind,
                    headers={"retry-after": str(retry), **{k.decode(): v.decode() for k, v in headers}})
        return headers

    async def _decide(self, limits: list[Limit]) -> list[Outcome] | None:
        if self.redis is None or self.script is None:
            return self.local.check(limits)
        args: list[float] = [PERIOD * 1000]
        for limit in limits:
            args += [limit.rate, limit.cost]
        script = self.script
        try:
            raw = await self.redis.run("ratelimit", lambda: script(keys=[lim.key for lim in limits], args=args))
        except RedisUnavailable:
            if self.on_redis_failure == "open":
                return None
            if self.on_redis_failure == "closed":
                raise RouterError(503, "The rate limiter is unavailable; try again shortly.",
                                  code="rate_limiter_unavailable") from None
            return self.local.check(limits)
        return [Outcome(bool(raw[1 + 4 * i]), int(raw[2 + 4 * i]), raw[3 + 4 * i] / 1000, raw[4 + 4 * i] / 1000)
                for i in range(len(limits))]
