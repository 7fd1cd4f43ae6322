"""Unit tests of the observability pieces: the fast metric families (and their multiprocess sync), the usage
tap on streams, request ids, usage and cost settling, and log rotation shared by several writers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router.config import load_settings
from router.observability.exchange import ESTIMATED, UPSTREAM, Exchange
from router.observability.fast import FastCollector, FastCounter, FastHistogram
from router.observability.logs import SharedRotatingFileHandler
from router.observability.metrics import Metrics
from router.observability.observer import Observer, new_request_id, request_id_of
from router.providers.base import ChatCall
from router.routing.usage import UsageTap, ask_for_usage
from router.upstream import SSEResponse
from tests.test_observability import sample


def scrape(*families: Any) -> str:
    registry = CollectorRegistry()
    registry.register(FastCollector(families))
    return generate_latest(registry).decode()


def test_fast_histogram_buckets_follow_prometheus_le() -> None:
    h = FastHistogram("t_seconds", "doc", ("a",), (0.1, 1.0))
    child = h.labels("x")
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        child.observe(v)
    text = scrape(h)
    assert sample(text, "t_seconds_bucket", a="x", le="0.1") == 2  # le: value <= bound
    assert sample(text, "t_seconds_bucket", a="x", le="1.0") == 4
    assert sample(text, "t_seconds_bucket", a="x", le="+Inf") == 5
    assert sample(text, "t_seconds_count", a="x") == 5
    assert sample(text, "t_seconds_sum", a="x") == pytest.approx(4.65)


def test_fast_counter_and_sync_adds_only_what_is_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from prometheus_client import multiprocess, values

    values.ValueClass = values.get_value_class()  # multiprocess values from here on
    try:
        c = FastCounter("u_total", "doc", ("k",))
        h = FastHistogram("v_seconds", "doc", (), (1.0,))
        c.labels("a").inc(2)
        h.labels().observe(0.5)
        c.sync()
        h.sync()
        c.labels("a").inc(3)
        h.labels().observe(5)
        c.sync()
        h.sync()
        c.sync()  # nothing new: nothing added
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        text = generate_latest(registry).decode()
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = values.get_value_class()
    assert sample(text, "u_total", k="a") == 5
    assert sample(text, "v_seconds_bucket", le="1.0") == 1 and sample(text, "v_seconds_bucket", le="+Inf") == 2
    assert sample(text, "v_seconds_sum") == pytest.approx(5.5)


class _Priced:
    def expected_cost(self, prompt: int, completion: int) -> float | None:
        return (prompt * 2 + completion * 8) / 1e6


def observer(**env: str) -> Observer:
    return Observer(load_settings(**env), Metrics())


def test_settle_takes_upstream_usage_and_prices_it() -> None:
    obs = observer()
    ex = Exchange("r", "/v1/chat/completions")
    ex.provider = "openai"
    obs.settle(ex, {"prompt_tokens": 100, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 40}},
               {"messages": []}, _Priced())  # type: ignore[arg-type]
    assert (ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens, ex.usage_source) == (100, 20, 40, UPSTREAM)
    assert ex.cost == pytest.approx((100 * 2 + 20 * 8) / 1e6)


def test_settle_estimates_without_usage_and_marks_it() -> None:
    obs = observer()
    ex = Exchange("r", "/v1/chat/completions")
    obs.settle(ex, None, {"model": "m", "messages": [{"role": "user", "content": "hello " * 40}]}, None, 7)
    assert ex.usage_source == ESTIMATED and ex.prompt_tokens and ex.prompt_tokens > 10 and ex.completion_tokens == 7
    assert ex.cost is None  # no deployment, no price: unknown, not free


def test_settle_a_cache_hit_costs_nothing_and_anthropic_usage_reads() -> None:
    obs = observer()
    ex = Exchange("r", "/v1/messages")
    ex.cache_hit = True
    obs.settle(ex, {"input_tokens": 12, "output_tokens": 4}, None, _Priced())  # type: ignore[arg-type]
    assert (ex.prompt_tokens, ex.completion_tokens, ex.cost) == (12, 4, 0.0)


def test_metrics_record_labels_and_bounded_models() -> None:
    obs = observer(METRICS_KEY_LABELS="true")
    for i in range(3):
        ex = Exchange(new_request_id(), "/v1/chat/completions")
        ex.model, ex.deployment, ex.provider, ex.status, ex.client = "g", "d1", "openai", 200, "team"
        ex.started = 0.0  # exact arithmetic: 0.01 after a large clock reading can land just above the bucket bound
        ex.stream, ex.first_token, ex.upstream_seconds = True, ex.started + 0.01, 0.0
        obs.settle(ex, {"prompt_tokens": 10, "completion_tokens": 5}, None, _Priced())  # type: ignore[arg-type]
        obs.finish(ex, ex.started + 0.05 + i * 0.01)
    text = obs.metrics.render().decode()
    genai = {"gen_ai_request_model": "g", "deployment": "d1", "gen_ai_provider_name": "openai"}
    assert sample(text, "gen_ai_client_operation_duration_seconds_count", **genai, status_class="2xx") == 3
    assert sample(text, "gen_ai_server_time_to_first_token_seconds_bucket", **genai, le="0.01") == 3
    # (duration - ttft) / (output tokens - 1): 0.04/4, 0.05/4, 0.06/4
    assert sample(text, "gen_ai_server_time_per_output_token_seconds_sum", **genai) == pytest.approx(0.0375)
    assert sample(text, "router_client_requests_total", client="team") == 3
    assert sample(text, "router_client_cost_usd_total", client="team") == pytest.approx(3 * 60 / 1e6)


def test_client_label_is_off_by_default() -> None:
    obs = observer()
    ex = Exchange("r", "/v1/chat/completions")
    ex.client, ex.status = "team", 200
    obs.finish(ex, ex.started + 0.01)
    assert "team" not in obs.metrics.render().decode()


def test_request_ids() -> None:
    a, b = new_request_id(), new_request_id()
    assert a != b and a.startswith("req_")
    assert request_id_of([(b"x-request-id", b"abc-123")]) == "abc-123"
    for bad in (b"", b"x" * 201, "caf\u00e9".encode(), b"a\nb"):
        assert request_id_of([(b"x-request-id", bad)]).startswith("req_")


# -- the usage tap --------------------------------------------------------------------------------

def chunk(content: str | None, usage: Any = "absent", choices: bool = True) -> bytes:
    event: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
                             if choices else []}
    if usage != "absent":
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _source(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def tap(chunks: list[bytes], strip: bool) -> tuple[bytes, SSEResponse, UsageTap]:
    response = SSEResponse(_source([]))
    t = UsageTap(_source(chunks), response, strip)

    async def read() -> bytes:
        return b"".join([c async for c in t])

    return asyncio.run(read()), response, t


USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


def test_the_tap_removes_what_asking_added_and_keeps_the_usage() -> None:
    asked = [chunk("Hel", None), chunk("lo", None), chunk(None, USAGE, choices=False), b"data: [DONE]\n\n"]
    plain = [chunk("Hel"), chunk("lo"), b"data: [DONE]\n\n"]
    out, response, t = tap(asked, strip=True)
    assert out == b"".join(plain)
    assert response.usage == USAGE


def test_the_tap_leaves_a_stream_whose_client_asked_alone() -> None:
    asked = [chunk("Hel", None), chunk(None, USAGE, choices=False), b"data: [DONE]\n\n"]
    out, response, _ = tap(asked, strip=False)
    assert out == b"".join(asked) and response.usage == USAGE


def test_the_tap_handles_events_joined_and_spaced_json() -> None:
    spaced = (b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": null}\n\n'
              b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
              b"data: [DONE]\n\n")
    out, response, _ = tap([spaced], strip=True)
    assert out == b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\ndata: [DONE]\n\n'
    assert response.usage == {"prompt_tokens": 1, "completion_tokens": 1}


def test_ask_for_usage_splices_the_body_or_merges_options() -> None:
    body = b'{"model":"m","messages":[],"stream":true}'
    call = ChatCall("m", orjson.loads(body), body, True, False)
    asked = ask_for_usage(call)
    assert orjson.loads(asked.body) == {**orjson.loads(body), "stream_options": {"include_usage": True}}
    assert asked.include_usage and asked.body.endswith(body[1:])
    with_options = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_obfuscation": False}}
    merged = ask_for_usage(ChatCall("m", with_options, orjson.dumps(with_options), True, False))
    assert orjson.loads(merged.body)["stream_options"] == {"include_obfuscation": False, "include_usage": True}


# -- rotation shared by several writers -----------------------------------------------------------

def test_two_writers_rotate_once_and_both_follow(tmp_path: Path) -> None:
    path = tmp_path / "router.log"
    a, b = SharedRotatingFileHandler(str(path)), SharedRotatingFileHandler(str(path))
    for h in (a, b):
        h.setFormatter(logging.Formatter("%(message)s"))

    def emit(h: SharedRotatingFileHandler, msg: str) -> None:
        h.handle(logging.LogRecord("t", logging.INFO, __file__, 1, msg, None, None))

    emit(a, "day1-a")
    emit(b, "day1-b")
    a.rollover_at = b.rollover_at = 0  # midnight passed for both
    emit(a, "day2-a")
    emit(b, "day2-b")
    a.write_text("day2-batch\n")
    rotated = list(tmp_path.glob("router.log.*"))
    assert len(rotated) == 1
    assert rotated[0].read_text().split() == ["day1-a", "day1-b"]
    assert path.read_text().split() == ["day2-a", "day2-b", "day2-batch"]
    for h in (a, b):
        h.close()
