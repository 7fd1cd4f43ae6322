"""OpenTelemetry traces over OTLP (HTTP/protobuf), when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a SERVER span per
request, parented on the client's W3C `traceparent`, and a CLIENT span per upstream attempt, whose
`traceparent` goes upstream (`upstream.outgoing_traceparent`, which `UpstreamClient.open` sends: agents and
their workers get it too). Attributes follow the GenAI semantic conventions (`gen_ai.operation.name`,
`gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.usage.*`), plus the deployment, attempts, cache hit and
cost; never a key, a prompt or an answer. Spans are exported in batches by the SDK's thread.

Off (the endpoint unset), `from_settings` returns None, neither the tracing SDK nor the exporter is imported,
and each hook's call site is one `is not None` test."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router import upstream
from router.observability.metrics import OPERATIONS

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from router.config import Settings
    from router.observability.exchange import Exchange

_PROPAGATED = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
SHUTDOWN_TIMEOUT_MS = 3000


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("llm-router")
        self.propagator = TraceContextTextMapPropagator()
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._error = StatusCode.ERROR
        self._in_context = set_span_in_context

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        endpoint = settings.otel_exporter_otlp_endpoint
        if not endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        return cls(provider)

    def start_request(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> None:
        carrier = {_PROPAGATED[name]: value.decode("latin-1") for name, value in headers if name in _PROPAGATED}
        parent = self.propagator.extract(carrier) if carrier else None
        ex.span = self.tracer.start_span(
            OPERATIONS.get(ex.endpoint, "chat"), context=parent, kind=self._server,
            start_time=int(ex.received_at * 1e9),
            attributes={"http.request.method": "POST", "url.path": ex.endpoint, "router.request_id": ex.request_id,
                        "gen_ai.operation.name": OPERATIONS.get(ex.endpoint, "chat")})

    def start_attempt(self, ex: Exchange, deployment: str, provider: str, upstream_model: str,
                      server_address: str | None) -> tuple[Span, Token[str | None]]:
        operation = OPERATIONS.get(ex.endpoint, "chat")
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                                      "gen_ai.request.model": upstream_model, "router.deployment": deployment}
        if server_address:
            attributes["server.address"] = server_address
        context = self._in_context(ex.span) if ex.span is not None else None
        span = self.tracer.start_span(f"{operation} {upstream_model}", context=context, kind=self._client,
                                      attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._in_context(span))
        return span, upstream.outgoing_traceparent.set(carrier.get("traceparent"))

    def end_attempt(self, handle: object, error: BaseException | None) -> None:
        span: Span
        token: Token[str | None]
        span, token = handle  # type: ignore[misc]
        if error is not None:
            code = getattr(error, "code", None) or error.__class__.__name__
            span.set_attribute("error.type", str(code))
            status = getattr(error, "status", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
            span.set_status(self._error, str(code))
        span.end()
        try:
            upstream.outgoing_traceparent.reset(token)
        except ValueError:  # ended from a stream's close, in another context: the request's context is gone
            pass

    def finish(self, ex: Exchange) -> None:
        span = ex.span
        if span is None:
            return
        operation = OPERATIONS.get(ex.endpoint, "chat")
        span.update_name(f"{operation} {ex.model}")
        attributes: dict[str, Any] = {"gen_ai.request.model": ex.model, "gen_ai.provider.name": ex.provider,
                                      "http.response.status_code": ex.status, "router.attempts": ex.attempts,
                                      "router.cache_hit": ex.cache_hit, "router.stream": ex.stream}
        for name, value in (("router.deployment", ex.deployment), ("gen_ai.usage.input_tokens", ex.prompt_tokens),
                            ("gen_ai.usage.output_tokens", ex.completion_tokens), ("router.cost_usd", ex.cost),
                            ("router.usage_source", ex.usage_source), ("router.client", ex.client)):
            if value is not None:
                attributes[name] = value
        if ex.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [ex.finish_reason]
        if ex.first_token is not None:
            attributes["router.time_to_first_token_s"] = ex.first_token - ex.started
        span.set_attributes(attributes)
        if ex.status >= 400 or ex.error_code:
            span.set_attribute("error.type", ex.error_code or str(ex.status))
            if ex.status >= 500 or ex.error_code:
                span.set_status(self._error)
        span.end(end_time=int((ex.received_at + ex.duration) * 1e9))

    def shutdown(self) -> None:
        self.provider.force_flush(SHUTDOWN_TIMEOUT_MS)
        self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; traces go to its `/v1/traces`."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"
