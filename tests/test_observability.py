"""Prometheus metrics and the rotated log file."""

from __future__ import annotations

import logging
import re
import sqlite3
import sys
from pathlib import Path

from router.config import Settings
from router.observability import LineFormatter, setup_logging, stop_logging
from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import AgentProcess, free_port

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
    assert sample(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="dummy") == 3
    assert sample(text, "router_requests_in_flight") == 0
    assert UPSTREAM_KEY not in text and "client-key" not in text


def test_metrics_are_summed_across_workers(start_router) -> None:
    router = start_router(workers=2)
    for _ in range(20):
        with router.http() as http:  # a new connection each time, so both workers get traffic
            assert http.post("/v1/chat/completions", json={"model": "dummy", "messages": MSG}).status_code == 200
    # each worker adds its per-request metrics to the shared files every second (and before it answers a scrape)
    with router.http() as http:
        assert wait_for(lambda: sample(http.get("/metrics").text, "router_requests_total", model="dummy",
                                       status="200") == 20, 5)
        text = http.get("/metrics").text
    assert sample(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_request_model="dummy") == 20
    assert sample(text, "router_requests_in_flight") == 0


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


FORGED = "x\nFAKE 2026-01-01 CRITICAL forged"


def test_control_characters_in_a_logged_model_name_stay_on_one_line(start_router, tmp_path: Path) -> None:
    """A model name with a newline is logged (a huggingface model fetched from an unreachable hub) as one line.

    The CLI refuses such names now, so the row is written straight into the registry, as a database from
    before that check (or edited by hand) could hold it: whatever reaches a log line stays on one line."""
    router = start_router({"HF_CACHE_DIR": str(tmp_path / "hf")})
    dead_hub = f"http://127.0.0.1:{free_port()}"
    refused = router.cli("add-model", FORGED, "huggingface", dead_hub, "weight")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert router.cli("add-model", "placeholder", "huggingface", dead_hub, "weight").returncode == 0
    with sqlite3.connect(tmp_path / "data" / "models.db") as conn:
        conn.execute("UPDATE model_groups SET name = ? WHERE name = 'placeholder'", (FORGED,))
        conn.execute("UPDATE deployments SET model_group = ? WHERE model_group = 'placeholder'", (FORGED,))
    with router.http() as http:
        assert wait_for(lambda: FORGED in [m["id"] for m in http.get("/v1/models").json()["data"]], 5)
        resp = http.post("/v1/chat/completions", json={"model": FORGED, "messages": MSG})
    assert resp.status_code == 404, resp.text
    log = tmp_path / "logs" / "router.log"
    assert wait_for(lambda: log.exists() and "fetching from the hub" in log.read_text(), 5)
    assert wait_for(lambda: "router.access" in log.read_text(), 5)
    lines = log.read_text().splitlines()
    forged = [line for line in lines if "FAKE" in line]
    # the hub fetch's line and the request's access line, each one line with the newline escaped
    assert len(forged) == 2 and all("x\\nFAKE 2026-01-01 CRITICAL forged" in line for line in forged)
    assert any("fetching from the hub" in line for line in forged)
    assert any("router.access" in line and "status=404" in line for line in forged)
    assert not any(line.startswith("FAKE") for line in lines)


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("router", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_line_formatter_escapes_control_characters_after_formatting() -> None:
    fmt = LineFormatter("%(levelname)s %(message)s")
    out = fmt.format(record("model %s: %r", "a\r\nb\x1b[31m\x00\x7f\x85\u2028\u2029c\td", {"k": "v\n"}))
    assert out == "ERROR model a\\r\\nb\\x1b[31m\\x00\\x7f\\x85\\u2028\\u2029c\td: {'k': 'v\\n'}"
    assert len(out.splitlines()) == 1
    assert fmt.format(record("plain ascii, é and 日本")) == "ERROR plain ascii, é and 日本"


def test_line_formatter_keeps_tracebacks_multi_line() -> None:
    out = LineFormatter("%(message)s").format(record("failed for %s", "m\nFAKE", exc=True))
    first, *rest = out.splitlines()
    assert first == "failed for m\\nFAKE"
    assert rest[0] == "Traceback (most recent call last):" and "ValueError: boom" in rest


def test_queue_handler_and_file_keep_one_line_per_record(tmp_path: Path) -> None:
    """setup_logging: the message is escaped once, before the queue; the traceback reaches the file as lines."""
    setup_logging(Settings(log_dir=str(tmp_path), log_level="INFO"))  # type: ignore[call-arg]
    logger = logging.getLogger("router.test")
    try:
        logger.info("model %s", FORGED)
        try:
            raise RuntimeError("inner")
        except RuntimeError:
            logger.exception("unhandled error serving model %s", FORGED)
    finally:
        stop_logging()
    lines = (tmp_path / "router.log").read_text().splitlines()
    assert [line for line in lines if "FAKE" in line] == [lines[0], lines[1]]
    assert lines[0].endswith("router.test: model x\\nFAKE 2026-01-01 CRITICAL forged")
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: inner"


def test_local_agent_log_lines_are_escaped(tmp_path: Path) -> None:
    """The Local Agent's own logging: a worker named with a newline is logged on one line."""
    agent = AgentProcess(tmp_path, {"workers": [{"model": FORGED, "launcher": "external",
                                                 "url": f"http://127.0.0.1:{free_port()}/v1"}]})
    try:
        agent.start()
        assert wait_for(lambda: "FAKE" in agent.output(), 10)
    finally:
        agent.stop()
    lines = agent.output().splitlines()
    assert any("x\\nFAKE 2026-01-01 CRITICAL forged" in line for line in lines)
    assert not any(line.startswith("FAKE") for line in lines)
