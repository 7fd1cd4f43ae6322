"""Prometheus metrics and the rotated log file."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for

MSG = [{"role": "user", "content": "hi"}]


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_metrics_count_requests_latency_and_in_flight(start_router, openai_stub: OpenAIStub) -> None:
    router = start_router({"OPENAI_BASE_URL": openai_stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY})
    with router.http() as http:
        for _ in range(3):
            http.post("/v1/chat/completions", json={"model": "dummy", "messages": MSG})
        http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG, "stream": True})
        http.post("/v1/chat/completions", json={"model": "nope", "messages": MSG})
        text = http.get("/metrics").text
    assert sample(text, "router_requests_total", model="dummy", provider="dummy", status="200") == 3
    assert sample(text, "router_requests_total", model="gpt-4o", provider="openai", status="200") == 1
    assert sample(text, "router_requests_total", status="404") == 1
    assert sample(text, "router_request_duration_seconds_count", model="dummy") == 3
    assert sample(text, "router_requests_in_flight") == 0
    assert UPSTREAM_KEY not in text and "client-key" not in text


def test_metrics_are_summed_across_workers(start_router) -> None:
    router = start_router(workers=2)
    for _ in range(20):
        with router.http() as http:  # a new connection each time, so both workers get traffic
            assert http.post("/v1/chat/completions", json={"model": "dummy", "messages": MSG}).status_code == 200
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "router_requests_total", model="dummy", status="200") == 20


def test_log_file_written_and_secrets_kept_out(start_router, tmp_path: Path, openai_stub: OpenAIStub) -> None:
    router = start_router({"LOG_LEVEL": "debug", "OPENAI_BASE_URL": openai_stub.url,
                           "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "ROUTER_AGENT_TOKEN": "tok-secret-123"})
    with router.http() as http:
        http.post("/v1/chat/completions", json={"model": "gpt-error-401", "messages": MSG},
                  headers={"Authorization": "Bearer client-secret-key"})
    log = tmp_path / "logs" / "router.log"
    assert wait_for(lambda: log.exists() and "router ready" in log.read_text(), 5)
    text = log.read_text() + router.output()
    assert "DEBUG" in text  # LOG_LEVEL is honoured
    for secret in (UPSTREAM_KEY, "tok-secret-123", "client-secret-key"):
        assert secret not in text
