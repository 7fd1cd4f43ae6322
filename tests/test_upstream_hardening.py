"""The upstream client under bad upstreams: stale pooled connections, huge or invalid answers, keys echoed
back, the upstream's own rate-limit headers, and routes that loop back to the router."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web

from router.config import Settings
from router.errors import RouterError, Scrubber, upstream_error
from router import hops
from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess
from tests.support.server import ClosingKeepAliveServer, ThreadedServer

MESSAGES = [{"role": "user", "content": "hi"}]
LIMIT = 1024 * 1024


def chat(http: httpx.Client, model: str, stream: bool = False, **headers: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "stream": stream},
                     headers=headers)


def error_code(resp: httpx.Response) -> str | None:
    return resp.json()["error"]["code"]  # type: ignore[no-any-return]


def stream_error(resp: httpx.Response) -> dict[str, object]:
    """The final `data: {"error": ...}` event of a stream."""
    events = [e.removeprefix(b"data: ") for e in resp.content.split(b"\n\n") if e.strip()]
    last = orjson.loads(events[-1])
    assert isinstance(last, dict) and "error" in last, events[-1][:200]
    return last["error"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory, openai_stub: OpenAIStub) -> Iterator[RouterProcess]:
    """A router in front of the OpenAI stub, with 1 MB answer and stream-line bounds and rate limits on."""
    proc = RouterProcess(tmp_path_factory.mktemp("hardened"), {
        "OPENAI_BASE_URL": openai_stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "LOCAL_AGENT_URL": "",
        "UPSTREAM_TIMEOUT": "20", "MAX_RESPONSE_BYTES": str(LIMIT), "MAX_STREAM_LINE_BYTES": str(LIMIT),
        "RATE_LIMIT_REQUESTS": "100000", "CACHE_MODE": "off",
    }).start()
    yield proc
    proc.stop()


# -- stale pooled connections (item 8) ---------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_reused_connection_closed_before_answering_is_retried_on_a_fresh_one(start_router, reset: bool) -> None:
    upstream = ClosingKeepAliveServer(reset=reset).start()
    try:
        router = start_router({"OPENAI_BASE_URL": upstream.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY})
        with router.http() as http:
            answers = [chat(http, "gpt-4o", stream=i % 2 == 1) for i in range(6)]
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert all(b"fresh" in a.content for a in answers)
        # every other request found its pooled connection dropped, and was answered on a new one
        assert upstream.dropped == 3 and upstream.answered == 6
    finally:
        upstream.stop()


@pytest.mark.parametrize("retries", [0, 2])
def test_fresh_connection_closed_before_answering_is_not_retried_by_the_transport(start_router, retries: int) -> None:
    """The client resends at once only on a *pooled* connection closed under it; a new connection that fails
    is a real failure, which the dispatcher's attempt budget (1 + ROUTER_NUM_RETRIES) may try again."""
    upstream = ClosingKeepAliveServer(answer=0).start()
    try:
        router = start_router({"OPENAI_BASE_URL": upstream.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
                               "ROUTER_NUM_RETRIES": str(retries)})
        with router.http() as http:
            resp = chat(http, "gpt-4o")
        assert resp.status_code == 502 and error_code(resp) == "upstream_disconnected"
        assert upstream.connections == 1 + retries and upstream.dropped == 1 + retries
        assert resp.headers["x-router-attempts"] == str(1 + retries)
    finally:
        upstream.stop()


def test_requests_spaced_past_the_upstream_keepalive_never_fail(start_router) -> None:
    upstream = OpenAIStub(name="short-keepalive", key=UPSTREAM_KEY, keepalive_timeout=1.0).start()
    try:
        router = start_router({"OPENAI_BASE_URL": upstream.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY})
        statuses = []
        with router.http() as http:
            for i in range(8):
                statuses.append(chat(http, "gpt-4o").status_code)
                time.sleep(1.0 + 0.01 * i)  # just past the upstream's idle timeout
        assert statuses == [200] * 8
    finally:
        upstream.stop()


def test_keepalive_and_bounds_come_from_settings() -> None:
    from router.upstream import UpstreamClient

    settings = Settings(upstream_keepalive_timeout=2.5, max_response_bytes=4096, max_stream_line_bytes=2048)
    client = UpstreamClient.from_settings(settings, Scrubber())
    assert (client.keepalive_timeout, client.max_response_bytes, client.max_stream_line_bytes) == (2.5, 4096, 2048)


# -- response size (item 9) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-huge", "gpt-huge-length"])
def test_huge_answer_is_refused_without_reading_it_all(hardened: RouterProcess, stub: OpenAIStub, model: str) -> None:
    started = time.monotonic()
    with hardened.http() as http:
        resp = chat(http, model)
        assert resp.status_code == 502 and error_code(resp) == "upstream_response_too_large", resp.text[:300]
        assert str(LIMIT) in resp.json()["error"]["message"]
        if model == "gpt-huge":  # chunked: the router stopped reading and closed the connection
            assert wait_for(stub.client_gone.is_set, 10)
            assert stub.chunks_sent < 50
        assert chat(http, "gpt-4o").status_code == 200  # the next request is served as usual
    assert time.monotonic() - started < 15


def test_stream_line_beyond_the_bound_before_any_content_is_a_502(hardened: RouterProcess, stub: OpenAIStub) -> None:
    with hardened.http() as http:
        resp = chat(http, "gpt-huge", stream=True)
        # before any content: nothing was sent, so the client gets the error itself, not a 200 stream
        assert resp.status_code == 502 and error_code(resp) == "upstream_response_too_large"
        assert len(resp.content) < LIMIT  # the unfinished line was never relayed
        assert wait_for(stub.client_gone.is_set, 10) and stub.chunks_sent < 50
        normal = chat(http, "gpt-4o", stream=True)
    assert normal.status_code == 200 and normal.content.endswith(b"data: [DONE]\n\n")


# -- bad answers (item 10) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model,stream", [("gpt-bad-json", False), ("gpt-not-completion", False),
                                          ("gpt-html", False), ("gpt-html", True), ("gpt-json-only", True)])
def test_an_answer_of_the_wrong_shape_is_a_502(hardened: RouterProcess, stub: OpenAIStub, model: str,
                                               stream: bool) -> None:
    with hardened.http() as http:
        resp = chat(http, model, stream=stream)
    assert resp.status_code == 502 and error_code(resp) == "upstream_bad_response", resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")


class GarbageUpstream(ThreadedServer):
    """Answers every POST with 200 and an HTML page: a captive portal, a misconfigured proxy."""

    name = "garbage"

    def routes(self, app: web.Application) -> None:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<html>not an API</html>", content_type="text/html")

        app.router.add_post("/{tail:.*}", page)


@pytest.mark.parametrize("model", ["claude-3-5-sonnet-latest", "gemini-1.5-flash"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_translated_providers_answer_502_to_an_unreadable_200(start_router, model: str, stream: bool) -> None:
    upstream = GarbageUpstream().start()
    try:
        router = start_router({"ANTHROPIC_BASE_URL": upstream.url, "EXTERNAL_ANTHROPIC_KEY": "sk-ant-test-key-1234",
                               "GOOGLE_BASE_URL": upstream.url, "EXTERNAL_GOOGLE_KEY": "AIzaTestKey123456"})
        with router.http() as http:
            resp = chat(http, model, stream=stream)
        assert resp.status_code == 502 and error_code(resp) == "upstream_bad_response", resp.text[:300]
    finally:
        upstream.stop()


# -- keys where clients can see them (item 4) ----------------------------------------------------------------


def test_key_echoed_in_relayed_headers_never_reaches_the_client(hardened: RouterProcess, stub: OpenAIStub) -> None:
    with hardened.http() as http:
        for stream in (False, True):
            resp = chat(http, "gpt-leak", stream=stream)
            assert resp.status_code == 200
            assert UPSTREAM_KEY not in str(resp.headers)
            assert resp.headers["x-upstream-request-id"] == "req_[redacted]"
            assert "retry-after" not in resp.headers and "openai-processing-ms" not in resp.headers


def test_key_echoed_in_a_midstream_error_event_is_scrubbed(hardened: RouterProcess, stub: OpenAIStub) -> None:
    with hardened.http() as http:
        resp = chat(http, "gpt-leak", stream=True)
    assert resp.status_code == 200
    assert UPSTREAM_KEY.encode() not in resp.content
    assert UPSTREAM_KEY[: len(UPSTREAM_KEY) // 2 + 8].encode() not in resp.content  # nor half of it
    error = orjson.loads(resp.content.split(b"\n\n")[2].removeprefix(b"data: "))["error"]
    assert error == {"message": "key [redacted] was refused", "type": "[redacted]", "param": "[redacted]",
                     "code": "[redacted]"}
    assert resp.content.endswith(b"data: [DONE]\n\n")


def test_key_echoed_in_an_error_type_param_and_headers_is_scrubbed(hardened: RouterProcess,
                                                                   stub: OpenAIStub) -> None:
    with hardened.http() as http:
        resp = chat(http, "gpt-leak-error")
    assert resp.status_code == 429
    assert UPSTREAM_KEY not in resp.text and UPSTREAM_KEY not in str(resp.headers)
    assert resp.json()["error"] == {"message": "Rate limited for [redacted]", "type": "tier_[redacted]",
                                    "param": "[redacted]", "code": "[redacted]"}


def test_upstream_error_scrubs_every_field() -> None:
    scrub = Scrubber(["plain-secret-value"])
    body = orjson.dumps({"error": {"message": "m plain-secret-value", "type": "t plain-secret-value",
                                   "param": "sk-abcdefghijkl", "code": "plain-secret-value"}})
    err = upstream_error(400, body, scrub, "p", {"x-request-id": "plain-secret-value"})
    assert "plain-secret-value" not in err.body().decode() and "sk-abcdefghijkl" not in err.body().decode()
    assert err.headers == {"x-request-id": "[redacted]"}
    scrubbed = RouterError(502, "sk-abcdefghijkl", type="plain-secret-value", param="x plain-secret-value",
                           code="plain-secret-value").scrubbed(scrub)
    assert (scrubbed.message, scrubbed.type, scrubbed.param, scrubbed.code) == (
        "[redacted]", "[redacted]", "x [redacted]", "[redacted]")


# -- the upstream's x-ratelimit-* headers (item 18) -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_only_the_routers_own_ratelimit_headers_reach_the_client(hardened: RouterProcess, stub: OpenAIStub,
                                                                 stream: bool) -> None:
    with hardened.http() as http:
        resp = chat(http, "gpt-upstream-limits", stream=stream)
    assert resp.status_code == 200
    assert resp.headers.get_list("x-ratelimit-limit-requests") == ["100000"]
    assert resp.headers.get_list("x-ratelimit-remaining-requests") != ["998"]
    assert len(resp.headers.get_list("x-ratelimit-remaining-requests")) == 1
    assert resp.headers.get_list("x-ratelimit-reset-requests") != ["17s"]
    assert len(resp.headers.get_list("x-ratelimit-reset-requests")) == 1


# -- loops (item 2, loop part) ---------------------------------------------------------------------------


def test_hops_enter_appends_this_router_and_refuses_its_own_id() -> None:
    def scope(*values: bytes) -> dict[str, object]:
        return {"headers": [(b"host", b"x")] + [(b"x-llm-router-hops", v) for v in values]}

    hops.enter(scope(), "r1")
    assert hops.outgoing.get() == "r1"
    hops.enter(scope(b"a, b", b"c"), "r1")
    assert hops.outgoing.get() == "a,b,c,r1"
    with pytest.raises(RouterError) as caught:
        hops.enter(scope(b"a,r1,b"), "r1")
    assert caught.value.status == 508 and caught.value.code == "loop_detected"
    hops.enter(scope(b"r10"), "r1")  # ids are compared whole
    assert hops.outgoing.get() == "r10,r1"
    with pytest.raises(RouterError):
        hops.enter(scope(b",".join(b"x%d" % i for i in range(hops.MAX_HOPS))), "r1")
    hops.enter(scope(), None)
    assert hops.outgoing.get() == hops.PROCESS_ID and re.fullmatch(r"[0-9a-f]{12}", hops.PROCESS_ID)


def test_instance_id_setting_is_validated() -> None:
    assert Settings(router_instance_id="router-a.1").router_instance_id == "router-a.1"
    with pytest.raises(ValueError):
        Settings(router_instance_id="a,b")


def test_upstream_requests_carry_the_hop_header(hardened: RouterProcess, stub: OpenAIStub) -> None:
    with hardened.http() as http:
        assert chat(http, "gpt-4o", **{"x-llm-router-hops": "edge-1"}).status_code == 200
        first = stub.last().headers["x-llm-router-hops"]
        assert chat(http, "gpt-4o").status_code == 200
        second = stub.last().headers["x-llm-router-hops"]
    assert re.fullmatch(r"edge-1,[0-9a-f]{12}", first) and second == first.split(",")[1]


def requests_with_status(router: RouterProcess, status: int) -> float:
    text = httpx.get(router.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("router_requests_total{") and f'status="{status}"' in line)


def test_agent_registered_at_the_routers_own_address_is_a_508_not_a_storm(start_router, tmp_path: Path) -> None:
    router = start_router({"ROUTER_AGENT_TOKEN": "agent-token-0123456789", "LOCAL_AGENT_URL": ""})
    with router.http() as http:
        reg = http.post("/register", json={"name": "myself", "endpoint": router.url, "models": ["loop-model"]},
                        headers={"Authorization": "Bearer agent-token-0123456789"})
        assert reg.status_code == 200, reg.text
        started = time.monotonic()
        resp = chat(http, "loop-model")
        elapsed = time.monotonic() - started
        assert resp.status_code == 508 and error_code(resp) == "loop_detected", resp.text
        assert elapsed < 5
        assert http.get("/health").status_code == 200
    assert requests_with_status(router, 508) == 2  # the client's request and its one loop back: no more
