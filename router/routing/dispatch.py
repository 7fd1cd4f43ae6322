"""The dispatcher: one request to one of its group's deployments.

`Dispatcher.send` keeps the deployments that are enabled, healthy, within their own rpm/tpm (in this
process, through `ratelimit.LocalLimiter`) and whose context window fits the request; applies OpenRouter's
`provider` object (`only`, `ignore`, `order`, `allow_fallbacks`, `sort`, `max_price`), which is removed from
the body for every upstream but `openrouter`; lets the strategy choose; moves a request whose expected cost
is over `ROUTER_COST_THRESHOLD` to a healthy local deployment; rewrites the body for the deployment (its
`max_tokens_param`, its upstream model name) and the answer back (the public name); records the attempt in
the deployment's statistics exactly once (errors, streams and clients that leave included); and marks every
answer with `x-router-deployment` and `x-router-attempts`.

Failures (`classify`): a deployment fault (unreachable, timed out, 5xx, 429, overloaded) moves the request to
the next best deployment of its group not tried yet, then to the group's fallbacks (and before them the
client's own `models` list), at most `1 + ROUTER_NUM_RETRIES` attempts in all; the same deployment is tried
again, after a backoff with jitter or its Retry-After (capped), only when it is its group's one. A context
length failure goes only to groups with a larger window; a content-policy refusal only when the group
allows it; the client's own mistakes (400, 401, 403, 404, 422) are never retried. A stream counts as
answered once its first content arrives (read ahead, within the first-token timeout), so a failure before
then is retried as transparently as a non-stream's; after it, the relay ends the stream with an error event.
Each attempt runs under its deployment's timeouts (`upstream.attempt_timeout`). Nothing is computed that the
request does not need: a single deployment without limits or context window costs a few attribute reads.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from time import perf_counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from starlette.responses import Response

from router.auth import Client, check_model
from router.config import Settings
from router.errors import RouterError
from router.observability import Metrics
from router.observability.exchange import Exchange
from router.ratelimit import Limit, LocalLimiter
from router.providers.base import ChatCall
from router.routing.breaker import Breaker, BreakerSettings
from router.routing.deployment import Deployment, ModelGroup, RequestFacts, Strategy
from router.routing.failures import (
    ContentPolicy, ContextLengthExceeded, FirstByteTimeout, TransportFailure, UpstreamFailure, classify,
    from_stream_event, lift,
)
from router.routing.estimate import output_tokens, prompt_tokens
from router.routing.strategies import SORTS, build_strategy, queueing
from router.routing.usage import UsageTap, ask_for_usage
from router.upstream import SSEResponse, attempt_timeout, close_source

if TYPE_CHECKING:
    from router.observability.observer import Tracing

HEADER_NAME = "x-router-deployment"
HEADER = HEADER_NAME.encode()
ATTEMPTS_NAME = "x-router-attempts"  # upstream attempts the answer took (every answer that was routed)
ATTEMPTS = ATTEMPTS_NAME.encode()
_OTHER_LIMIT = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}
USD_PER_THRESHOLD_UNIT = 1e-5  # ROUTER_COST_THRESHOLD counts thousandths of a US cent


def _bad(message: str, param: str) -> RouterError:
    return RouterError(400, message, code="invalid_value", param=param)


def _names(value: object, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"'provider.{field}' must be an array of deployment names or provider types.",
                   f"provider.{field}")
    return tuple(v.lower() for v in value)


def _price(value: object, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _bad(f"'provider.max_price.{field}' must be a non-negative number (USD per million tokens).",
                   f"provider.max_price.{field}")
    return float(value)


@dataclass(slots=True)
class Steering:
    """OpenRouter's `provider` object, checked: names are deployment ids or provider types, lowercased."""

    only: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    order: tuple[str, ...] | None = None
    allow_fallbacks: bool = True
    sort: str | None = None
    max_prompt: float | None = None  # USD per million tokens
    max_completion: float | None = None

    @classmethod
    def parse(cls, value: object) -> Steering:
        if not isinstance(value, dict):
            raise _bad("'provider' must be an object.", "provider")
        sort = value.get("sort")
        if isinstance(sort, dict):  # OpenRouter's newer form: {"by": "price", ...}
            sort = sort.get("by")
        if sort is not None and sort not in SORTS:
            raise _bad(f"'provider.sort' must be one of {', '.join(SORTS)}.", "provider.sort")
        fallbacks = value.get("allow_fallbacks", True)
        if not isinstance(fallbacks, bool):
            raise _bad("'provider.allow_fallbacks' must be a boolean.", "provider.allow_fallbacks")
        max_price = value.get("max_price")
        if max_price is not None and not isinstance(max_price, dict):
            raise _bad("'provider.max_price' must be an object.", "provider.max_price")
        max_price = max_price or {}
        return cls(_names(value.get("only"), "only"), _names(value.get("ignore"), "ignore"),
                   _names(value.get("order"), "order"), fallbacks, sort,
                   _price(max_price.get("prompt"), "prompt"), _price(max_price.get("completion"), "completion"))

    def admits(self, d: Deployment) -> bool:
        if self.only is not None and not _matches(d, self.only):
            return False
        if self.ignore is not None and _matches(d, self.ignore):
            return False
        if self.max_prompt is not None and (d.input_price is None or d.input_price > self.max_prompt):
            return False  # an unknown price is never taken for a low one
        return self.max_completion is None or (d.output_price is not None and d.output_price <= self.max_completion)

    def ordered(self, candidates: Sequence[Deployment]) -> list[Deployment]:
        """The candidates `order` names, in its order."""
        out: list[Deployment] = []
        for name in self.order or ():
            out += [d for d in candidates if d not in out and _matches(d, (name,))]
        return out


def _matches(d: Deployment, names: tuple[str, ...]) -> bool:
    return d.id.lower() in names or d.type in names


class _Replayed:
    """A stream whose first chunks were read ahead (to see the first content arrive, or an error instead),
    then the rest as it comes."""

    __slots__ = ("head", "source")

    def __init__(self, head: list[bytes], source: AsyncIterator[bytes]) -> None:
        self.head, self.source = head, source

    def __aiter__(self) -> _Replayed:
        return self

    async def __anext__(self) -> bytes:
        if self.head:
            return self.head.pop(0)
        return await self.source.__anext__()

    async def aclose(self) -> None:
        await close_source(self.source)


#: what marks a chunk as carrying the answer: text (a legacy completion's `text` too), a tool call, a refusal,
#: the end; in Anthropic's Messages events, a block's delta or the end; in the Responses API's, a delta or the end
_CONTENT = re.compile(rb'"(?:content|reasoning_content|refusal|text)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[\s*\{'
                      rb'|"finish_reason"\s*:\s*"|\[DONE\]|content_block_delta|message_stop'
                      rb'|response\.output_text\.delta|response\.function_call_arguments\.delta|response\.completed')
_READ_AHEAD_LIMIT = 64 * 1024  # bytes read ahead before the first content at most (then it is sent as it is)


async def _first_content(response: SSEResponse) -> None:
    """Read `response`'s stream up to its first content, and keep what was read for the client; raise the
    failure instead when the stream reports one (an error event, a broken or truncated stream) before any
    content: nothing has been sent, so another deployment may answer. (A stream's role-only first chunk is
    not content: a failure right after it is still transparent.)"""
    source = response.body_iterator
    head: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await source.__anext__()
        except StopAsyncIteration:
            break
        if b'"error"' in chunk or b"blockReason" in chunk:
            failure = classify(response.failure) if response.failure is not None else from_stream_event(chunk)
            if failure is not None:
                await close_source(source)
                raise failure
        head.append(chunk)
        size += len(chunk)
        if _CONTENT.search(chunk) is not None or size > _READ_AHEAD_LIMIT:
            break
    response.body_iterator = _Replayed(head, source)


class _Request:
    """One request's way through its groups and their deployments: attempts made, what failed and why."""

    __slots__ = ("call", "steer", "strip", "attempts", "tried", "skipped", "last", "too_long", "limited", "facts",
                 "needs_larger", "ex")

    def __init__(self, call: ChatCall, steer: Steering | None, strip: bool, ex: Exchange | None) -> None:
        self.call, self.steer, self.strip, self.ex = call, steer, strip, ex
        self.attempts = 0
        self.tried: list[str] = []  # each failed attempt, for the final error
        self.skipped: list[str] = []  # each deployment left out, and why
        self.last: UpstreamFailure | None = None
        self.too_long = self.limited = 0
        self.facts: RequestFacts | None = None
        self.needs_larger: int | None = None  # after a context-length failure: the window that was too small


class Dispatcher:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 resolve: Callable[[str], ModelGroup] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None,
                 breaker: Breaker | None = None, metrics: Metrics | None = None) -> None:
        self.clock = clock
        self.threshold = settings.router_cost_threshold * USD_PER_THRESHOLD_UNIT  # USD; 0: no rule
        self.sorts: dict[str, Strategy] = {sort: build_strategy(name, settings) for sort, name in SORTS.items()}
        #: deployments' own rpm/tpm, keyed by group and id (the same across route-table rebuilds)
        self._limits = LocalLimiter()
        self.attempt_limit = 1 + settings.router_num_retries
        self.retry_after_cap = settings.router_retry_after_cap
        self.first_token_timeout = settings.upstream_first_token_timeout
        self.resolve = resolve  # a group's fallbacks by name (None: fallbacks are not followed)
        self.sleep = sleep
        self.rng = rng or random.Random()
        #: circuits per deployment: ejected ones are left out (never all of a group), outcomes recorded
        self.breaker = breaker if breaker is not None else Breaker(BreakerSettings.from_settings(settings), clock)
        self.metrics = metrics  # failures, retries and fallbacks (only ever on the failure path)
        self.tracing: Tracing | None = None  # a client span per attempt, when tracing is on

    async def send(self, group: ModelGroup, call: ChatCall, client: Client | None = None,
                   then: Sequence[ModelGroup] = (), ex: Exchange | None = None) -> Response | SSEResponse:
        """The answer of one of `group`'s deployments, or of the groups after it: `then` (the client's own
        `models` list), then each group's fallbacks. A deployment fault moves the request to the next best
        deployment not tried yet, at most `1 + ROUTER_NUM_RETRIES` attempts in all; the same deployment is
        tried again (after a backoff) only when it is its group's one. `client`'s allow-list was checked on
        `group` and `then`; fallbacks it does not allow are passed over. `ex`, the request's record, learns
        the deployment that answered, the attempts, the time spent upstream and a stream's first token."""
        raw_steer = call.payload.get("provider")
        steer = Steering.parse(raw_steer) if raw_steer is not None else None
        req = _Request(call, steer, raw_steer is not None or "models" in call.payload, ex)
        try:
            return await self._send(group, client, then, req)
        finally:
            if ex is not None:
                ex.attempts = req.attempts

    async def _send(self, group: ModelGroup, client: Client | None, then: Sequence[ModelGroup],
                    req: _Request) -> Response | SSEResponse:
        call = req.call
        queue = [group, *then]
        seen: set[int] | None = None  # the groups queued, once a fallback is added
        i = 0
        while i < len(queue) and req.attempts < self.attempt_limit:
            g = queue[i]
            i += 1
            if req.needs_larger is not None and not _larger(g, req.needs_larger):
                req.skipped.append(f"model {g.name or call.model}: context window not larger")
                continue
            last = i == len(queue) and not g.fallbacks  # nothing after it: its one deployment may be tried again
            if g is not group and self.metrics is not None:
                self.metrics.fallbacks.labels(self.metrics.model_label(group.name or call.model),
                                              self.metrics.model_label(g.name or call.model)).inc()
            response = await self._group(g, req if g is group else self._moved(req, g), last)
            if response is not None:
                response.raw_headers.append((ATTEMPTS, str(req.attempts).encode()))
                return response
            for name in g.fallbacks:  # this group is exhausted: its fallbacks next, in order
                fallback = self._fallback(name, client)
                if seen is None:
                    seen = {id(q) for q in queue}
                if fallback is not None and id(fallback) not in seen:
                    seen.add(id(fallback))
                    queue.append(fallback)
        raise self._final(group, req)

    def _fallback(self, name: str, client: Client | None) -> ModelGroup | None:
        if self.resolve is None:
            return None
        try:
            g = self.resolve(name)
            if client is not None:
                check_model(client, g.name or name)
        except RouterError:  # gone from the registry, or not this key's: passed over
            return None
        return g

    @staticmethod
    def _moved(req: _Request, g: ModelGroup) -> _Request:
        """`req` bound for another group: its body names that group (the answer then carries its name)."""
        call = req.call
        if g.name and g.name != call.model:
            payload = {**call.payload, "model": g.name}
            payload.pop("models", None)
            req.call = ChatCall(g.name, payload, orjson.dumps(payload), call.stream, call.include_usage, call.op,
                                call.context)
            req.facts = None
        return req

    async def _group(self, group: ModelGroup, req: _Request, last: bool) -> Response | SSEResponse | None:
        """One group's answer, or None once its deployments are exhausted (the reasons are in `req`). A group
        of one deployment tries it again after a backoff when it is the `last` group the request may go to."""
        call, steer = req.call, req.steer
        now = self.clock()
        candidates: list[Deployment] = []
        for d in group.deployments:
            if not d.enabled:
                req.skipped.append(f"{_label(d)}: disabled")
            elif not d.healthy():
                req.skipped.append(f"{_label(d)}: not live")
            elif steer is not None and not steer.admits(d):
                req.skipped.append(f"{_label(d)}: excluded by 'provider'")
            elif d.context_window is not None or d.rpm or d.tpm:
                if req.facts is None:
                    req.facts = self._facts(call, steer)
                need = req.facts.prompt_tokens + req.facts.output_tokens
                if d.context_window is not None and need > d.context_window:
                    req.too_long += 1
                    req.skipped.append(f"{_label(d)}: context window {d.context_window} < {need} tokens")
                elif (d.rpm or d.tpm) and not self._within_limits(d, need, now, charge=False):
                    req.limited += 1
                    req.skipped.append(f"{_label(d)}: over its own rate limit")
                else:
                    candidates.append(d)
            else:
                candidates.append(d)
        if steer is not None and steer.order:
            ordered = steer.ordered(candidates)
            if not steer.allow_fallbacks:
                candidates = ordered
        else:
            ordered = []
        again = 0  # tries of the same deployment (a group of one)
        breaker = self.breaker
        while candidates and req.attempts < self.attempt_limit:
            pool = breaker.available(candidates, now)  # the ejected left out (if all are, the oldest failure)
            d = self._choose(group, pool, [o for o in ordered if o in pool] if ordered else ordered, call,
                             steer, req.facts, now)
            breaker.begin(d, now)
            if d.rpm or d.tpm:
                req.facts = req.facts or self._facts(call, steer)
                self._within_limits(d, req.facts.prompt_tokens + req.facts.output_tokens, now, charge=True)
            req.attempts += 1
            if req.attempts > 1 and self.metrics is not None:
                self.metrics.retries.labels(self.metrics.model_label(d.group or call.model)).inc()
            try:
                return await self._attempt(d, call, req.strip, req.ex)
            except RouterError as exc:
                exc.headers = {**(exc.headers or {}), HEADER_NAME: d.id, ATTEMPTS_NAME: str(req.attempts)}
                failure = classify(exc)
                if self.metrics is not None:
                    self.metrics.upstream_failures.labels(self.metrics.model_label(d.group or call.model), d.id,
                                                          failure.kind).inc()
                req.last = failure
                req.tried.append(f"{_label(d)}: {exc.message}")
                if isinstance(failure, ContextLengthExceeded):
                    req.needs_larger = d.context_window or 0
                    return None  # larger windows only, in the fallbacks
                if isinstance(failure, ContentPolicy) and group.content_policy_fallbacks:
                    return None
                if not failure.retry_other:
                    raise failure from None
                candidates = [c for c in candidates if c is not d]
                ordered = [c for c in ordered if c is not d]
                if (not candidates and last and failure.retry_same and len(group.deployments) == 1
                        and req.attempts < self.attempt_limit):
                    again += 1
                    await self.sleep(self._backoff(again, failure.cooldown(self.retry_after_cap)))
                    candidates = [d]
                    now = self.clock()
        return None

    def _backoff(self, n: int, retry_after: float | None) -> float:
        """Seconds before trying the same deployment again: its Retry-After (capped), else 0.25 s x 2^(n-1)
        with full jitter."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        return self.rng.uniform(0, min(self.retry_after_cap, 0.25 * 2 ** (n - 1)))

    def _final(self, group: ModelGroup, req: _Request) -> RouterError:
        """The error for a request no deployment answered: a single attempt's own error; the last failure's
        status with every attempt named; or, when nothing was tried or nothing answered at all, why each
        deployment could not take it (503, or 400 when the request fits no context window)."""
        last = req.last
        unreachable = isinstance(last, TransportFailure)
        if last is not None and len(set(req.tried)) == 1 and not req.skipped and not (
                unreachable and group.deployments[0].type == "local"):
            error = last.error  # one deployment (tried once, or again after a backoff): its own error
        elif last is not None and (not unreachable or req.needs_larger is not None):
            error = last.error
            if len(set(req.tried)) > 1:
                error = RouterError(error.status, f"{len(req.tried)} attempts failed: " + "; ".join(req.tried),
                                    code=error.code, type=error.type, headers=error.headers)
        else:
            fits_nowhere = req.too_long > 0 and not req.limited and not req.tried
            error = self._none_left(group, req.call, req.skipped + req.tried, fits_nowhere, req.facts)
        error.headers = {**(error.headers or {}), ATTEMPTS_NAME: str(req.attempts)}
        return error

    def _facts(self, call: ChatCall, steer: Steering | None) -> RequestFacts:
        return RequestFacts(prompt_tokens(call.payload), output_tokens(call.payload), call.stream,
                            steer.sort if steer is not None else None)

    def _within_limits(self, d: Deployment, tokens: int, now: float, charge: bool) -> bool:
        key = f"rl:deployment:{d.group}\x00{d.id}:"
        limits = [Limit(key + kind, kind, "deployment", rate, cost)
                  for kind, rate, cost in (("requests", d.rpm, 1), ("tokens", d.tpm, tokens)) if rate]
        return all(o.allowed for o in self._limits.check(limits, now, charge))

    def _choose(self, group: ModelGroup, candidates: Sequence[Deployment], ordered: list[Deployment], call: ChatCall,
                steer: Steering | None, facts: RequestFacts | None, now: float) -> Deployment:
        local = False
        if len(candidates) == 1:
            d = candidates[0]
        elif ordered:
            d = ordered[0]
        else:
            facts = facts or self._facts(call, steer)
            strategy = self.sorts[facts.sort] if facts.sort is not None else group.strategy
            d = strategy.choose(candidates, facts, now)
        if self.threshold and not d.local and d.input_price is not None:
            local = any(c.local for c in candidates)
        if local:  # the cost threshold: an expensive request goes to a healthy local deployment
            facts = facts or self._facts(call, steer)
            cost = d.expected_cost(facts.prompt_tokens, facts.output_tokens)
            if cost is not None and cost > self.threshold:
                locals_ = [c for c in candidates if c.local]
                d = locals_[0] if len(locals_) == 1 else group.strategy.choose(locals_, facts, now)
        return d

    async def _attempt(self, d: Deployment, call: ChatCall, strip: bool,
                       ex: Exchange | None = None) -> Response | SSEResponse:
        """One deployment's answer. A stream is read up to its first content (within the deployment's first
        token timeout) before it counts as answered, so that a failure before then can go elsewhere. A stream
        always asks for its usage (`router.routing.usage`): the client sees it only if it asked."""
        sent = _prepare(call, d, (_ROUTER_ONLY_OPENROUTER if d.type == "openrouter" else _ROUTER_ONLY) if strip else ())
        if sent.stream and not sent.include_usage and sent.op in _ASKS_USAGE:
            sent = ask_for_usage(sent)
        if ex is not None:
            ex.deployment, ex.provider, ex.target = d.id, d.type, d
            t0 = perf_counter()
            trace = self.tracing.start_attempt(ex, d.id, d.type, d.upstream_model,
                                               urlsplit(getattr(d.provider, "base_url", "")).hostname) \
                if self.tracing is not None else None
        stats, clock = d.stats, self.clock
        # the queue this request joins at a deployment that is full: its timings are scaled back to the
        # deployment's own speed, which the strategies scale again by the queue then (else a sample taken
        # in a queue would count the queue twice, and long after it drained)
        slowdown = queueing(d)
        started = clock()
        stats.begin()
        timeouts = attempt_timeout.set(d.stream_timeout if call.stream else d.request_timeout)  # type: ignore[arg-type]
        response: Response | SSEResponse | None = None
        try:
            if call.stream:
                limit = d.first_token_timeout or self.first_token_timeout
                try:
                    async with asyncio.timeout(limit):
                        response = await (d.provider.chat(sent) if sent.op == "chat"
                                          else getattr(d.provider, sent.op)(sent))
                        if isinstance(response, SSEResponse):
                            response.body_iterator = response.tap = UsageTap(
                                response.body_iterator, response, sent.op in _ASKS_USAGE and not call.include_usage,
                                [] if ex is not None and ex.log_content else None)
                            await _first_content(response)
                except TimeoutError:
                    raise FirstByteTimeout.after(limit, d.id) from None
                now = clock()
                stats.first_byte((now - started) / slowdown, now)
                if ex is not None:
                    ex.first_token = perf_counter()
            else:
                response = await (d.provider.chat(sent) if sent.op == "chat" else getattr(d.provider, sent.op)(sent))
        except BaseException as exc:
            if isinstance(response, SSEResponse):
                await close_source(response.body_iterator)
            if ex is not None:
                ex.upstream_seconds += perf_counter() - t0
                if trace is not None and self.tracing is not None:
                    self.tracing.end_attempt(trace, exc)
            now = clock()
            failure = lift(exc)
            if failure is None:  # cancelled (the client left), or a bug: no verdict on the deployment
                self.breaker.release(d)
            else:
                self.breaker.record_failure(d, failure, now)
            # the client's own mistakes (4xx but 429) say nothing about the deployment's health
            ok = isinstance(exc, RouterError) and exc.status < 500 and exc.status != 429
            stats.end((now - started) / slowdown, now, ok, call.stream)
            if failure is not None and isinstance(exc, RouterError):
                raise failure from None  # classified once: the caller decides on this very object
            raise
        finally:
            attempt_timeout.reset(timeouts)
        self.breaker.record_success(d)
        if d.rename is not None:
            response = d.rename.response(response)
        tracing = self.tracing
        if isinstance(response, SSEResponse):
            def ended() -> None:
                now = clock()
                stats.end((now - started) / slowdown, now, True, True)
                if ex is not None:
                    ex.upstream_seconds += perf_counter() - t0
                    if trace is not None and tracing is not None:
                        tracing.end_attempt(trace, None)

            response.on_close.append(ended)
        else:
            now = clock()
            stats.end((now - started) / slowdown, now, True, False)
            if ex is not None:
                ex.upstream_seconds += perf_counter() - t0
                if trace is not None and tracing is not None:
                    tracing.end_attempt(trace, None)
        response.raw_headers.append((HEADER, d.id.encode()))
        return response

    @staticmethod
    def _none_left(group: ModelGroup, call: ChatCall, reasons: list[str], fits_nowhere: bool,
                   facts: RequestFacts | None) -> RouterError:
        if fits_nowhere and facts is not None:
            need = facts.prompt_tokens + facts.output_tokens
            largest = max(d.context_window or 0 for d in group.deployments)
            return RouterError(400, f"This request needs about {need} tokens (prompt estimate plus output limit), "
                               f"more than any deployment of '{call.model}' can take ({largest} tokens at most).",
                               code="context_length_exceeded", param="messages")
        why = "; ".join(reasons) or "none is configured"
        if group.deployments and all(d.type == "local" for d in group.deployments):
            return RouterError(503, f"No live agent serves '{call.model}' right now ({why}); retry shortly.",
                               code="no_live_agent", headers={"Retry-After": "5"})
        return RouterError(503, f"No deployment of '{call.model}' can take this request now ({why}); "
                           "retry shortly.", code="no_deployment_available", headers={"Retry-After": "1"})


def _larger(g: ModelGroup, window: int) -> bool:
    """Whether a group has a deployment whose known context window is larger than `window`."""
    return any(d.context_window is not None and d.context_window > window for d in g.deployments)


def _label(d: Deployment) -> str:
    return f"agent {d.id.removeprefix('agent-')}" if d.live is not None else f"deployment {d.id}"


#: request fields only the router reads (OpenRouter's `provider` object, which OpenRouter reads too, and its
#: `models` list, which the router follows itself: OpenRouter must not retry inside our retries)
_ROUTER_ONLY = ("provider", "models")
_ROUTER_ONLY_OPENROUTER = ("models",)
#: operations whose streams take OpenAI's `stream_options.include_usage`
_ASKS_USAGE = frozenset({"chat", "completions"})


def _prepare(call: ChatCall, d: Deployment, drop: tuple[str, ...]) -> ChatCall:
    """The request as deployment `d` must receive it, without the fields in `drop`; `call` itself when nothing
    changes (bytes untouched)."""
    payload: dict[str, Any] = call.payload
    changed = False
    if drop and any(k in payload for k in drop):
        payload = {k: v for k, v in payload.items() if k not in drop}
        changed = True
    param = d.provider.max_tokens_param if call.op == "chat" else None
    if param is not None:
        other = _OTHER_LIMIT[param]
        if other in payload and param not in payload:
            payload = {(param if k == other else k): v for k, v in payload.items()}
            changed = True
    rename = d.rename
    if rename is None:
        return ChatCall(call.model, payload, orjson.dumps(payload), call.stream,
                        call.include_usage, call.op, call.context) if changed else call
    if not changed:
        payload = dict(payload)
    payload["model"] = rename.upstream
    body = orjson.dumps(payload) if changed else rename.request(call.body)
    return ChatCall(rename.upstream, payload, body, call.stream, call.include_usage, call.op, call.context)
