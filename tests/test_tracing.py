"""Tracing (issue 13 §7) against an OTLP receiver the test starts: a server span per request parented on the
client's `traceparent`, a client span per upstream attempt whose `traceparent` the upstream receives, GenAI
attributes, no key or prompt in what is exported; off (no endpoint), the tracing SDK is not even imported."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.fault_stub import FaultStub
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.otlp_receiver import CLIENT, SERVER, OtlpReceiver
from tests.support.processes import run_cli

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SECRET_PROMPT = "a prompt nobody may export"


@pytest.fixture()
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


def test_spans_parent_on_the_client_and_reach_the_upstream(start_router, stub: OpenAIStub,
                                                           receiver: OtlpReceiver) -> None:
    router = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
                           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
                           "OTEL_SERVICE_NAME": "router-under-test", "ROUTER_MASTER_KEY": "master-secret"})
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-4o", "stream": True,
                                                       "messages": [{"role": "user", "content": SECRET_PROMPT}]},
                         headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01",
                                  "Authorization": "Bearer master-secret"})
    assert resp.status_code == 200
    sent = stub.requests[-1].headers["traceparent"]
    assert sent.startswith(f"00-{TRACE_ID}-")
    assert wait_for(lambda: len(receiver.spans) >= 2, 10)
    server = next(s for s in receiver.spans if s.kind == SERVER)
    client = next(s for s in receiver.spans if s.kind == CLIENT)
    assert server.trace_id == client.trace_id == TRACE_ID and server.parent_span_id == PARENT
    assert client.parent_span_id == server.span_id and sent.split("-")[2] == client.span_id
    assert server.service == "router-under-test" and server.name == "chat gpt-4o"
    assert server.attributes["gen_ai.request.model"] == "gpt-4o"
    assert server.attributes["gen_ai.provider.name"] == "openai"
    assert server.attributes["gen_ai.usage.input_tokens"] == 9
    assert server.attributes["gen_ai.usage.output_tokens"] == 3
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["router.request_id"] == resp.headers["x-request-id"]
    assert client.attributes["gen_ai.operation.name"] == "chat" and client.attributes["server.address"] == "127.0.0.1"
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    exported = b"".join(receiver.raw)
    for secret in (UPSTREAM_KEY, "master-secret", SECRET_PROMPT):
        assert secret.encode() not in exported


def test_each_attempt_is_a_span_and_failures_are_marked(start_router, tmp_path: Path,
                                                       receiver: OtlpReceiver) -> None:
    bad, good = FaultStub(name="bad").start(), FaultStub(name="good").start()
    try:
        bad.set(fail_next=1000, fail_status=503)
        for name, stub in (("bad-d", bad), ("good-d", good)):  # both in the registry before the router starts
            assert run_cli(tmp_path, "add-model", "pair", "openai", stub.url, "api", "--name", name,
                           "--upstream-model", "gpt-4o").returncode == 0
        router = start_router({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
        with router.http() as http:
            statuses = [http.post("/v1/chat/completions",
                                  json={"model": "pair", "messages": [{"role": "user", "content": "hi"}]},
                                  headers={"x-router-cache": "off"}).status_code for _ in range(4)]
        assert statuses == [200] * 4
        assert wait_for(lambda: sum(s.kind == SERVER for s in receiver.spans) == 4, 10)
        clients = [s for s in receiver.spans if s.kind == CLIENT]
        failed = [s for s in clients if s.attributes["router.deployment"] == "bad-d"]
        assert failed and all(s.status_code == 2 and s.attributes["http.response.status_code"] == 503
                              for s in failed)  # STATUS_CODE_ERROR
        servers = {s.span_id: s for s in receiver.spans if s.kind == SERVER}
        assert all(c.parent_span_id in servers for c in clients)
        assert sum(s.attributes["router.attempts"] for s in servers.values()) == len(clients)
    finally:
        bad.stop()
        good.stop()


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    """Neither the tracing SDK nor the exporter (redis-py loads OpenTelemetry's metrics SDK itself when present)."""
    code = ("import sys; from router.config import load_settings; from router.state import RouterState; "
            "s = RouterState(load_settings(SQLITE_DB_PATH=sys.argv[1])); "
            "assert s.tracing is None; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk.trace') or "
            "m.startswith('opentelemetry.exporter')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.db")], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
