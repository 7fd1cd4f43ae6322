"""The dispatcher: one request to one of its group's deployments.

`Dispatcher.send` keeps the deployments that are enabled, healthy, within their own rpm/tpm (in this
process, through `ratelimit.LocalLimiter`) and whose context window fits the request; applies OpenRouter's
`provider` object (`only`, `ignore`, `order`, `allow_fallbacks`, `sort`, `max_price`), which is removed from
the body for every upstream but `openrouter`; lets the strategy choose; moves a request whose expected cost
is over `ROUTER_COST_THRESHOLD` to a healthy local deployment; rewrites the body for the deployment (its
`max_tokens_param`, its upstream model name) and the answer back (the public name); records the attempt in
the deployment's statistics exactly once (errors, streams and clients that leave included); and marks every
answer with `x-router-deployment`. A deployment that could not be reached before answering
(`upstream.NOT_ANSWERED`) is skipped for the next candidate. Nothing is computed that the request does not
need: a single deployment without limits or context window costs a few attribute reads.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from router.auth import Client
from router.config import Settings
from router.errors import RouterError
from router.ratelimit import Limit, LocalLimiter
from router.providers.base import ChatCall
from router.routing.deployment import Deployment, ModelGroup, RequestFacts, Strategy
from router.routing.estimate import output_tokens, prompt_tokens
from router.routing.stats import DeploymentStats
from router.routing.strategies import SORTS, build_strategy, queueing
from router.upstream import NOT_ANSWERED, SSEResponse, close_source

HEADER_NAME = "x-router-deployment"
HEADER = HEADER_NAME.encode()
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


class _Timed:
    """A stream's body iterator that reports its first chunk as the deployment's time to first token."""

    __slots__ = ("source", "stats", "started", "clock", "queueing", "waiting")

    def __init__(self, source: AsyncIterator[bytes], stats: DeploymentStats, started: float,
                 clock: Callable[[], float], queueing: float) -> None:
        self.source, self.stats, self.started, self.clock, self.queueing = source, stats, started, clock, queueing
        self.waiting = True

    def __aiter__(self) -> _Timed:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.source.__anext__()
        if self.waiting:
            self.waiting = False
            now = self.clock()
            self.stats.first_byte((now - self.started) / self.queueing, now)
        return chunk

    async def aclose(self) -> None:
        await close_source(self.source)


class Dispatcher:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.threshold = settings.router_cost_threshold * USD_PER_THRESHOLD_UNIT  # USD; 0: no rule
        self.sorts: dict[str, Strategy] = {sort: build_strategy(name, settings) for sort, name in SORTS.items()}
        #: deployments' own rpm/tpm, keyed by group and id (the same across route-table rebuilds)
        self._limits = LocalLimiter()

    async def send(self, group: ModelGroup, call: ChatCall, client: Client | None = None) -> Response | SSEResponse:
        """The answer of one of `group`'s deployments (`client`: who asks; its allow-list was checked on the
        group, so every deployment of an allowed group is allowed)."""
        payload = call.payload
        raw_steer = payload.get("provider")
        steer = Steering.parse(raw_steer) if raw_steer is not None else None
        facts: RequestFacts | None = None
        now = self.clock()
        candidates: list[Deployment] = []
        skipped: list[str] = []  # why each deployment left out was: the client is told if none is left
        too_long = limited = 0
        for d in group.deployments:
            if not d.enabled:
                skipped.append(f"{_label(d)}: disabled")
            elif not d.healthy():
                skipped.append(f"{_label(d)}: not live")
            elif steer is not None and not steer.admits(d):
                skipped.append(f"{_label(d)}: excluded by 'provider'")
            elif d.context_window is not None or d.rpm or d.tpm:
                if facts is None:
                    facts = self._facts(call, steer)
                need = facts.prompt_tokens + facts.output_tokens
                if d.context_window is not None and need > d.context_window:
                    too_long += 1
                    skipped.append(f"{_label(d)}: context window {d.context_window} < {need} tokens")
                elif (d.rpm or d.tpm) and not self._within_limits(d, need, now, charge=False):
                    limited += 1
                    skipped.append(f"{_label(d)}: over its own rate limit")
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
        tried: list[str] = []
        last: RouterError | None = None
        strip = raw_steer is not None
        while candidates:
            d = self._choose(group, candidates, ordered, call, steer, facts, now)
            if d.rpm or d.tpm:
                facts = facts or self._facts(call, steer)
                self._within_limits(d, facts.prompt_tokens + facts.output_tokens, now, charge=True)
            try:
                return await self._attempt(d, call, strip)
            except RouterError as exc:
                exc.headers = {**(exc.headers or {}), HEADER_NAME: d.id}
                if exc.code not in NOT_ANSWERED:
                    raise
                last = exc
                tried.append(f"{_label(d)}: {exc.message}")
                candidates = [c for c in candidates if c is not d]
                ordered = [c for c in ordered if c is not d]
        if last is not None and len(tried) == 1 and not skipped and d.type != "local":
            raise last  # the group's one deployment did not answer: its own error says most
        fits_nowhere = too_long > 0 and not limited and not tried
        raise self._none_left(group, call, skipped + tried, fits_nowhere, facts)

    def _facts(self, call: ChatCall, steer: Steering | None) -> RequestFacts:
        return RequestFacts(prompt_tokens(call.payload), output_tokens(call.payload), call.stream,
                            steer.sort if steer is not None else None)

    def _within_limits(self, d: Deployment, tokens: int, now: float, charge: bool) -> bool:
        key = f"rl:deployment:{d.group}\x00{d.id}:"
        limits = [Limit(key + kind, kind, "deployment", rate, cost)
                  for kind, rate, cost in (("requests", d.rpm, 1), ("tokens", d.tpm, tokens)) if rate]
        return all(o.allowed for o in self._limits.check(limits, now, charge))

    def _choose(self, group: ModelGroup, candidates: list[Deployment], ordered: list[Deployment], call: ChatCall,
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

    async def _attempt(self, d: Deployment, call: ChatCall, strip: bool) -> Response | SSEResponse:
        sent = _prepare(call, d, strip and d.type != "openrouter")
        stats, clock = d.stats, self.clock
        # the queue this request joins at a deployment that is full: its timings are scaled back to the
        # deployment's own speed, which the strategies scale again by the queue then (else a sample taken
        # in a queue would count the queue twice, and long after it drained)
        slowdown = queueing(d)
        started = clock()
        stats.begin()
        try:
            response = await d.provider.chat(sent)
        except BaseException as exc:
            now = clock()
            # the client's own mistakes (4xx but 429) say nothing about the deployment's health
            ok = isinstance(exc, RouterError) and exc.status < 500 and exc.status != 429
            stats.end((now - started) / slowdown, now, ok, call.stream)
            raise
        if d.rename is not None:
            response = d.rename.response(response)
        if isinstance(response, SSEResponse):
            response.body_iterator = _Timed(response.body_iterator, stats, started, clock, slowdown)

            def ended() -> None:
                now = clock()
                stats.end((now - started) / slowdown, now, True, True)

            response.on_close.append(ended)
        else:
            now = clock()
            stats.end((now - started) / slowdown, now, True, False)
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


def _label(d: Deployment) -> str:
    return f"agent {d.id.removeprefix('agent-')}" if d.live is not None else f"deployment {d.id}"


def _prepare(call: ChatCall, d: Deployment, strip: bool) -> ChatCall:
    """The request as deployment `d` must receive it; `call` itself when nothing changes (bytes untouched)."""
    payload: dict[str, Any] = call.payload
    changed = False
    if strip:
        payload = {k: v for k, v in payload.items() if k != "provider"}
        changed = True
    param = d.provider.max_tokens_param
    if param is not None:
        other = _OTHER_LIMIT[param]
        if other in payload and param not in payload:
            payload = {(param if k == other else k): v for k, v in payload.items()}
            changed = True
    rename = d.rename
    if rename is None:
        return ChatCall(call.model, payload, orjson.dumps(payload), call.stream,
                        call.include_usage) if changed else call
    if not changed:
        payload = dict(payload)
    payload["model"] = rename.upstream
    body = orjson.dumps(payload) if changed else rename.request(call.body)
    return ChatCall(rename.upstream, payload, body, call.stream, call.include_usage)
