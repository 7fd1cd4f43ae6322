"""Prometheus metrics. Per request (`record`, from the request's `Exchange`): the OpenTelemetry GenAI
client and server metrics (operation duration, time to first token, time per output token, token usage by
type, with the conventions' names, units and bucket boundaries), cost in USD, the router's own overhead, and
requests by model, provider and status; these are `router.observability.fast` families, a few microseconds
in all. Elsewhere (failure paths, scrape time): cache, rate limits, budgets, Redis, agents, breaker state.
With several workers (`router serve --workers N`) the values live in prometheus-client's multiprocess files
and `/metrics` sums them (the fast families are synced into them every second and before a scrape)."""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client import disable_created_metrics

from router.observability.exchange import Exchange
from router.observability.fast import FastCollector, FastCounter, FastGauge, FastHistogram

log = logging.getLogger("router")

# the OpenTelemetry GenAI semantic conventions' explicit bucket boundaries, each for its metric
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: labels of the per-request GenAI series (semantic-convention names, dots as underscores)
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_request_model", "deployment", "gen_ai_provider_name")
STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
MAX_MODEL_LABELS = 500  # beyond this many distinct names, further models count as "other"

disable_created_metrics()  # the *_created series only add noise to scrapes


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # per request: `record`, from fast families (see router.observability.fast)
        self.requests = FastCounter("router_requests_total", "Requests by model, provider and status",
                                    ("model", "provider", "status"))
        self.duration = FastHistogram("gen_ai_client_operation_duration_seconds",
                                      "GenAI operation duration: from the request to the last byte of the answer",
                                      (*GENAI_LABELS, "status_class", "cache_hit"), DURATION_BUCKETS)
        self.ttft = FastHistogram("gen_ai_server_time_to_first_token_seconds",
                                  "Time to the first content of a streamed answer", GENAI_LABELS, TTFT_BUCKETS)
        self.tpot = FastHistogram("gen_ai_server_time_per_output_token_seconds",
                                  "Time per output token of a streamed answer, after the first",
                                  GENAI_LABELS, TPOT_BUCKETS)
        self.tokens = FastHistogram("gen_ai_client_token_usage", "Tokens used per request, by type (input, output)",
                                    (*GENAI_LABELS, "gen_ai_token_type"), TOKEN_BUCKETS)
        self.cost = FastCounter("router_cost_usd_total", "Spend in US dollars, from the deployments' prices",
                                GENAI_LABELS[1:])
        self.unpriced = FastCounter("router_unpriced_requests_total",
                                    "Answered requests whose cost is unknown (a deployment without a known price)",
                                    GENAI_LABELS[1:])
        self.overhead = FastHistogram("router_overhead_seconds",
                                      "Time a request spends in the router itself (its duration less the time "
                                      "waiting on upstreams)", ("gen_ai_operation_name",), OVERHEAD_BUCKETS)
        self.in_flight = FastGauge("router_requests_in_flight", "Requests being served")
        self.client_requests = FastCounter("router_client_requests_total",
                                           "Requests by client key name (METRICS_KEY_LABELS)", ("client",))
        self.client_cost = FastCounter("router_client_cost_usd_total",
                                       "Spend in US dollars by client key name (METRICS_KEY_LABELS)", ("client",))
        self.fast = (self.requests, self.duration, self.ttft, self.tpot, self.tokens, self.cost, self.unpriced,
                     self.overhead, self.in_flight, self.client_requests, self.client_cost)
        self.registry.register(FastCollector(self.fast))
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.key_labels = False  # METRICS_KEY_LABELS
        self.budget_rejections = Counter("router_budget_rejections_total", "Requests refused by a key's budget",
                                         registry=self.registry)
        self.request_log_dropped = Counter("router_request_log_dropped_total",
                                           "Request log rows dropped because the write queue was full",
                                           registry=self.registry)
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
        self._series: dict[tuple[str, str, str, str, int, bool], _Series] = {}

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return "other"

    def record(self, ex: Exchange) -> None:
        """One request's metrics, from its record (after its last byte)."""
        key = (ex.endpoint, ex.model, ex.deployment or "", ex.provider, ex.status, ex.cache_hit)
        series = self._series.get(key)
        if series is None:  # label lookups are done once per label set, not per request
            series = self._series[key] = _Series(self, key)
        duration = ex.duration
        series.requests.inc()
        series.duration.observe(duration)
        series.overhead.observe(max(0.0, duration - ex.upstream_seconds))
        prompt, completion = ex.prompt_tokens, ex.completion_tokens
        if prompt is not None:
            series.input_tokens.observe(prompt)
        if completion is not None:
            series.output_tokens.observe(completion)
        if ex.first_token is not None:
            ttft = ex.first_token - ex.started
            series.ttft.observe(ttft)
            if completion is not None and completion > 1:
                series.tpot.observe((duration - ttft) / (completion - 1))
        cost = ex.cost
        if cost is not None:
            series.cost.inc(cost)
        elif ex.status < 400 and not ex.cache_hit:
            series.unpriced.inc()
        if self.key_labels:
            self.client_requests.labels(ex.client).inc()
            if cost is not None:
                self.client_cost.labels(ex.client).inc(cost)

    def sync(self) -> None:
        """Multiprocess mode: add what the fast families gained to this worker's metric files."""
        for family in self.fast:
            family.sync()

    def deployment_label(self, key: str) -> tuple[str, str]:
        """(model, deployment) labels from a deployment key (`group\x00id`)."""
        group, _, deployment = key.partition("\x00")
        return self.model_label(group or "prefix"), deployment

    def render(self) -> bytes:
        if self.multiprocess:
            self.sync()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _Series:
    """The fast-metric children of one label set (operation, model, deployment, provider, status, cache hit)."""

    __slots__ = ("requests", "duration", "overhead", "input_tokens", "output_tokens", "ttft", "tpot", "cost",
                 "unpriced")

    def __init__(self, m: Metrics, key: tuple[str, str, str, str, int, bool]) -> None:
        endpoint, model, deployment, provider, status, cache_hit = key
        operation = OPERATIONS.get(endpoint, endpoint)
        model = m.model_label(model)
        genai = (operation, model, deployment, provider)
        self.requests = m.requests.labels(model, provider, str(status))
        self.duration = m.duration.labels(*genai, STATUS_CLASSES.get(status // 100, "other"),
                                          "true" if cache_hit else "false")
        self.overhead = m.overhead.labels(operation)
        self.input_tokens = m.tokens.labels(*genai, "input")
        self.output_tokens = m.tokens.labels(*genai, "output")
        self.ttft = m.ttft.labels(*genai)
        self.tpot = m.tpot.labels(*genai)
        self.cost = m.cost.labels(model, deployment, provider)
        self.unpriced = m.unpriced.labels(model, deployment, provider)


#: `gen_ai.operation.name` by endpoint
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
              "/v1/messages": "chat", "/v1/responses": "chat"}
