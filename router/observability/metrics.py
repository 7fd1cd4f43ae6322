"""Prometheus metrics and rotated logs.

Metrics: requests by model, provider and status; a latency histogram; requests
in flight. With several workers (`router serve --workers N`) the values live in
prometheus-client's multiprocess files and `/metrics` sums them.
Logs: `LOG_DIR/router.log`, rotated at midnight, written by a background
thread (a queue handler), so logging never puts disk I/O on the request path.
Control characters in a logged message are escaped (`LineFormatter`), so a
value from a client (a model name with a newline) can never forge a line;
only a traceback spans several lines.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import disable_created_metrics

from router.config import Settings

log = logging.getLogger("router")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_MODEL_LABELS = 500  # beyond this many distinct names, further models count as "other"

disable_created_metrics()  # the *_created series only add noise to scrapes


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("router_requests_total", "Chat completion requests",
                                ("model", "provider", "status"), registry=self.registry)
        self.latency = Histogram("router_request_duration_seconds",
                                 "Time from request to the last byte of the answer",
                                 ("model", "provider"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("router_requests_in_flight", "Chat completion requests being served",
                               registry=self.registry, multiprocess_mode="livesum")
        self.client_requests = Counter("router_client_requests_total", "Chat requests by client (key name)",
                                       ("client",), registry=self.registry)
        self.rate_limited = Counter("router_rate_limited_total", "Requests refused by a rate limit",
                                    ("scope", "kind"), registry=self.registry)
        self.cache_requests = Counter("router_cache_requests_total", "Cache lookups by result",
                                      ("result",), registry=self.registry)
        self.cache_entries = Gauge("router_cache_entries", "Entries in the in-memory response cache",
                                   registry=self.registry, multiprocess_mode="livesum")
        self.cache_bytes = Gauge("router_cache_bytes", "Bytes in the in-memory response cache",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.redis_up = Gauge("router_redis_up", "1 while Redis answers, 0 after a failure",
                              registry=self.registry, multiprocess_mode="min")
        self.redis_errors = Counter("router_redis_errors_total", "Redis calls that failed or timed out",
                                    ("op",), registry=self.registry)
        # liveness (issue 10 §3): heartbeats must move neither counter
        self.route_rebuilds = Counter("router_route_rebuilds_total", "Route table rebuilds from the registry",
                                      registry=self.registry)
        self.agent_route_updates = Counter("router_agent_route_updates_total",
                                           "Agents joining, moving or leaving the route table", registry=self.registry)
        self._models: set[str] = set()
        self.weights_loaded = Gauge("router_weights_loaded", "1 while a Hugging Face model is loaded in this process",
                                    ("model",), registry=self.registry, multiprocess_mode="livesum")
        self.weights_waiting = Gauge("router_weights_waiting", "Requests waiting for a generation slot of a model",
                                     ("model",), registry=self.registry, multiprocess_mode="livesum")
        self.weights_load_seconds = Histogram("router_weights_load_seconds", "Time to load a Hugging Face model",
                                              ("model",), registry=self.registry,
                                              buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
        # resilience: all on the failure path or at scrape time, nothing per successful request; the
        # deployment label is a registry deployment name or `agent-NAME` (bounded by the registry)
        self.upstream_failures = Counter("router_upstream_failures_total",
                                         "Failed upstream attempts, by deployment and kind of failure",
                                         ("model", "deployment", "kind"), registry=self.registry)
        self.retries = Counter("router_retries_total", "Upstream attempts beyond a request's first",
                               ("model",), registry=self.registry)
        self.fallbacks = Counter("router_fallbacks_total", "Requests sent on to a fallback model group",
                                 ("model", "fallback"), registry=self.registry)
        self.ejections = Counter("router_deployment_ejections_total", "Deployments ejected by the circuit breaker",
                                 ("model", "deployment"), registry=self.registry)
        self.deployment_state = Gauge("router_deployment_state",
                                      "Circuit state per deployment that failed lately: 0 closed, 1 half-open, "
                                      "2 open, 3 cooling (a Retry-After)", ("model", "deployment"),
                                      registry=self.registry, multiprocess_mode="max")
        self._clients: dict[str, Counter] = {}
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return "other"

    def observe(self, model: str, provider: str, status: int, started: float) -> None:
        key = (model, provider, status)
        children = self._children.get(key)
        if children is None:  # label lookups are done once per label set, not per request
            children = self._children[key] = (self.requests.labels(model, provider, str(status)),
                                              self.latency.labels(model, provider))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def client(self, label: str) -> None:
        child = self._clients.get(label)
        if child is None:
            child = self._clients[label] = self.client_requests.labels(label)
        child.inc()

    def deployment_label(self, key: str) -> tuple[str, str]:
        """(model, deployment) labels from a deployment key (`group\x00id`)."""
        group, _, deployment = key.partition("\x00")
        return self.model_label(group or "prefix"), deployment

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


# C0 controls but tab, DEL, C1 controls (NEL included) and the Unicode line and paragraph separators
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """`text` with control characters written as Python escapes (`\\n`, `\\x1b`): always one line."""
    return text.translate(_ESCAPES)


class LineFormatter(logging.Formatter):
    """Escapes control characters in the formatted message (after %-formatting), never in the traceback
    that `format` appends, so one record is one line plus its traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


def console_handler(fmt: str) -> logging.Handler:
    """A stderr handler whose lines are escaped (the Local Agent's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter(fmt))
    return handler


_listener: logging.handlers.QueueListener | None = None


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


atexit.register(stop_logging)


def setup_logging(settings: Settings) -> None:
    """Route the `router` and uvicorn loggers through a queue to file and stderr."""
    global _listener
    stop_logging()
    os.makedirs(settings.log_dir, exist_ok=True)
    # the message is formatted and escaped once, by the queue handler, in the thread that logs; the writer
    # thread's handlers add the prefix to a message that may hold a traceback's lines, and escape nothing
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    file_handler = logging.handlers.TimedRotatingFileHandler(
        os.path.join(settings.log_dir, "router.log"), when="midnight", backupCount=14, encoding="utf-8")
    console = logging.StreamHandler()
    for h in (file_handler, console):
        h.setFormatter(fmt)
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(q, file_handler, console, respect_handler_level=False)
    _listener.start()
    handler = logging.handlers.QueueHandler(q)
    handler.setFormatter(LineFormatter("%(message)s"))
    for name in ("router", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False
