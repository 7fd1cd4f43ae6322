"""One request as the router saw it (`Exchange`): who asked, which model group and deployment answered, the
status, tokens, cost and timings. The endpoint fills it in as the request goes; its end (`Observer.finish`,
once per request, after the last byte) feeds the metrics, the request log, budgets, the access log and the
trace from this one record, so each of them reads the same facts."""

from __future__ import annotations

import time
from typing import Any

#: the request log's columns, in the order of `Exchange.row()`
ROW_COLUMNS = (
    "request_id", "ts", "endpoint", "key_name", "model", "deployment", "provider", "stream", "status",
    "error_code", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_source", "cost", "latency_ms",
    "ttft_ms", "cache_hit", "attempts", "request_body", "response_body",
)

#: where a request's token counts came from
UPSTREAM, COUNTED, ESTIMATED = "upstream", "counted", "estimated"


class Exchange:
    """The facts of one request. Times are `time.perf_counter()` seconds, except `received_at` (Unix time)."""

    __slots__ = ("request_id", "received_at", "started", "endpoint", "client", "key_name", "model", "deployment",
                 "provider", "stream", "status", "error_code", "prompt_tokens", "completion_tokens",
                 "cached_tokens", "usage_source", "cost", "first_token", "upstream_seconds", "attempts",
                 "cache_hit", "log_content", "request_body", "response_body", "ended", "finish_reason", "span",
                 "key", "target", "payload")

    def __init__(self, request_id: str, endpoint: str) -> None:
        self.request_id = request_id
        self.received_at = time.time()
        self.started = time.perf_counter()
        self.endpoint = endpoint
        self.client = "anonymous"  # the client's label: its key's name, `master`, or `anonymous`
        self.key_name: str | None = None  # the client key's name (None: no key)
        self.key: Any = None  # the client's `ClientKey` (budgets read it), None without one
        self.model = "unknown"  # the model group (the public name the client asked for, or the group it names)
        self.deployment: str | None = None  # the deployment that answered (the last one tried)
        self.provider = "none"  # that deployment's provider type
        self.stream = False
        self.status = 0
        self.error_code: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.usage_source: str | None = None  # UPSTREAM, COUNTED or ESTIMATED; None: no usage (an error)
        self.cost: float | None = None  # USD; None: unknown (a price is unknown), never taken for free
        self.first_token: float | None = None  # a stream's first content from the upstream
        self.upstream_seconds = 0.0  # time spent waiting on upstreams, all attempts together
        self.attempts = 0
        self.cache_hit = False
        self.log_content = False  # whether the request log keeps this request's body and answer
        self.request_body: bytes | None = None
        self.response_body: bytes | None = None
        self.ended: float | None = None  # when the last byte was sent
        self.finish_reason: str | None = None
        self.span: Any = None  # the server span, when tracing is on
        self.target: Any = None  # the `Deployment` that answered (its prices give the cost)
        self.payload: dict[str, Any] | None = None  # the parsed request (estimates read it)

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    @property
    def ttft(self) -> float | None:
        return self.first_token - self.started if self.first_token is not None else None

    @property
    def overhead(self) -> float:
        """Time spent in the router itself: the whole request less the time waiting on upstreams."""
        return max(0.0, self.duration - self.upstream_seconds)

    def row(self) -> tuple[Any, ...]:
        """The request log's row (`ROW_COLUMNS`)."""
        ttft = self.ttft
        return (self.request_id, self.received_at, self.endpoint, self.client, self.model, self.deployment,
                self.provider, int(self.stream), self.status, self.error_code, self.prompt_tokens,
                self.completion_tokens, self.cached_tokens, self.usage_source, self.cost,
                round(self.duration * 1000, 3), round(ttft * 1000, 3) if ttft is not None else None,
                int(self.cache_hit), self.attempts,
                self.request_body.decode("utf-8", "replace") if self.request_body is not None else None,
                self.response_body.decode("utf-8", "replace") if self.response_body is not None else None)

    def fields(self) -> dict[str, Any]:
        """The access log's fields (a JSON log line's keys)."""
        ttft = self.ttft
        return {"method": "POST", "path": self.endpoint, "model": self.model, "deployment": self.deployment,
                "provider": self.provider, "status": self.status, "error": self.error_code,
                "duration_ms": round(self.duration * 1000, 3),
                "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None, "stream": self.stream,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "usage_source": self.usage_source, "cost": self.cost,
                "client": self.client, "attempts": self.attempts, "cache_hit": self.cache_hit,
                "request_id": self.request_id}

    def __str__(self) -> str:
        """The access log's line."""
        ttft = self.ttft
        return (f"POST {self.endpoint} model={self.model} deployment={self.deployment or '-'} status={self.status}"
                + (f" error={self.error_code}" if self.error_code else "")
                + f" duration_ms={self.duration * 1000:.1f}"
                + (f" ttft_ms={ttft * 1000:.1f}" if ttft is not None else "")
                + f" tokens={_n(self.prompt_tokens)}/{_n(self.completion_tokens)}"
                + (f" cost={self.cost:.6f}" if self.cost is not None else "")
                + f" client={self.client} attempts={self.attempts}" + (" cache=hit" if self.cache_hit else "")
                + f" request_id={self.request_id}")


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
