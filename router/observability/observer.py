"""A request's beginning and end, for everything that watches requests: `begin` makes its `Exchange` (its
request id: the client's `x-request-id` when valid, else a new one, sent upstream and back), `settle` reads
its token usage from the answer and prices it, `finish` (once, after the last byte) hands the record to the
metrics, the budgets, the request log, the access log and the trace.

Usage, in order of trust: the answer's own `usage` (the upstream's; for a stream the router asked for it, see
`router.routing.usage`), counted by the router (in-process weights), else estimated and marked so."""

from __future__ import annotations

import itertools
import secrets
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from router.observability import logs
from router.observability.exchange import COUNTED, ESTIMATED, UPSTREAM, Exchange
from router.routing.estimate import prompt_tokens

if TYPE_CHECKING:
    from router.config import Settings
    from router.observability.metrics import Metrics
    from router.registry import ClientKey
    from router.routing.deployment import Deployment


class RequestLog(Protocol):
    """Where finished requests' rows go (`router.observability.request_log`)."""

    def submit(self, row: tuple[Any, ...]) -> None: ...


class Budgets(Protocol):
    """What spends a key's budget (`router.budgets`)."""

    def charge(self, key: ClientKey, cost: float) -> None: ...


class Tracing(Protocol):
    """Spans per request and per upstream attempt (`router.observability.tracing`)."""

    def start_request(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> None: ...

    def start_attempt(self, ex: Exchange, deployment: str, provider: str, upstream_model: str,
                      server_address: str | None) -> object: ...

    def end_attempt(self, handle: object, error: BaseException | None) -> None: ...

    def finish(self, ex: Exchange) -> None: ...

REQUEST_ID = b"x-request-id"
_PREFIX = "req_" + secrets.token_hex(6)
_COUNTER = itertools.count(1)
#: providers whose usage the router counts itself (weights in this process, the dummy)
COUNTING_TYPES = frozenset({"huggingface", "dummy"})


def new_request_id() -> str:
    """A request id unique across processes (a random prefix per process, then a counter)."""
    return f"{_PREFIX}{next(_COUNTER):x}"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `x-request-id` when it is a short printable ASCII value, else a new id."""
    for name, value in headers:
        if name == REQUEST_ID:
            if 0 < len(value) <= 200 and value.isascii():
                text = value.decode("ascii")
                if text.isprintable():
                    return text
            break
    return new_request_id()


def usage_in(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of a JSON answer, if it has one."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    return usage if isinstance(usage, dict) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Observer:
    def __init__(self, settings: Settings, metrics: Metrics, request_log: RequestLog | None = None,
                 budgets: Budgets | None = None, tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.request_log = request_log
        self.budgets = budgets
        self.tracing = tracing
        self.log_content = settings.request_log_content
        metrics.key_labels = settings.metrics_key_labels

    def begin(self, headers: list[tuple[bytes, bytes]], endpoint: str) -> Exchange:
        ex = Exchange(request_id_of(headers), endpoint)
        if self.tracing is not None:
            self.tracing.start_request(ex, headers)
        return ex

    def settle(self, ex: Exchange, usage: dict[str, Any] | None, payload: dict[str, Any] | None,
               deployment: Deployment | None, answer_units: int = 0) -> None:
        """The request's tokens (from `usage`, else estimated from `payload` and `answer_units`: a stream's
        content events or a body's bytes / 4) and its cost at `deployment`'s prices."""
        if usage is not None:
            prompt = _int(usage.get("prompt_tokens"))
            details = usage.get("prompt_tokens_details")
            cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
            if prompt is None and "input_tokens" in usage:  # Anthropic's: the cache's tokens are apart
                prompt = _int(usage.get("input_tokens"))
                cached = _int(usage.get("cache_read_input_tokens"))
                if prompt is not None:
                    prompt += (cached or 0) + (_int(usage.get("cache_creation_input_tokens")) or 0)
            completion = _int(usage.get("completion_tokens"))
            if completion is None:
                completion = _int(usage.get("output_tokens"))
            if completion is None and prompt is not None and "total_tokens" in usage:
                completion = 0  # embeddings: no output tokens
            if prompt is not None or completion is not None:
                ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens = prompt, completion, cached
                ex.usage_source = (ESTIMATED if usage.get("estimated") else
                                   COUNTED if ex.provider in COUNTING_TYPES else UPSTREAM)
        if ex.usage_source is None and payload is not None:
            ex.prompt_tokens = prompt_tokens(payload)
            ex.completion_tokens = answer_units
            ex.usage_source = ESTIMATED
        if deployment is not None and not ex.cache_hit:
            ex.cost = deployment.expected_cost(ex.prompt_tokens or 0, ex.completion_tokens or 0)
        elif ex.cache_hit:
            ex.cost = 0.0  # a cached answer asked no upstream

    def finish(self, ex: Exchange, ended: float) -> None:
        """The request is over (its last byte sent, or its connection gone): record it everywhere, once."""
        if ex.ended is not None:
            return
        ex.ended = ended
        self.metrics.record(ex)
        if self.budgets is not None and ex.key is not None and ex.cost:
            self.budgets.charge(ex.key, ex.cost)
        if self.request_log is not None:
            if not (ex.log_content or self.log_content):
                ex.request_body = ex.response_body = None
            self.request_log.submit(ex.row())
        if logs.access_log is not None:
            logs.access_log.submit(ex)
        if self.tracing is not None:
            self.tracing.finish(ex)
