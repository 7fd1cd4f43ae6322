"""Every failure answers an OpenAI error object with the right status, and the router keeps serving."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess, free_port
from tests.support.schema import assert_valid

MSG = [{"role": "user", "content": "hi"}]


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert_valid("ErrorResponse", body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body, param", [
    (b'{"model": "dummy", "messages": [', None),
    (b"[1, 2]", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "  ", "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "dummy"}', "messages"),
    (b'{"model": "dummy", "messages": []}', "messages"),
    (b'{"model": "dummy", "messages": "hi"}', "messages"),
    (b'{"model": "dummy", "messages": ["hi"]}', "messages[0]"),
    (b'{"model": "dummy", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "dummy", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
])
def test_bad_requests_are_400_with_param(router: RouterProcess, body: bytes, param: str | None) -> None:
    with router.http() as http:
        assert_error(http.post("/v1/chat/completions", content=body), 400, param=param)


def test_body_over_limit_is_413(router: RouterProcess) -> None:
    big = orjson.dumps({"model": "dummy", "messages": [{"role": "user", "content": "x" * 70000}]})
    with router.http() as http:
        assert_error(http.post("/v1/chat/completions", content=big), 413)
        # without a Content-Length (chunked upload), the limit still holds
        assert_error(http.post("/v1/chat/completions", content=iter([big[:40000], big[40000:]])), 413)
        assert http.post("/v1/chat/completions", json={"model": "dummy", "messages": MSG}).status_code == 200


def test_unknown_url_and_method_are_openai_errors(router: RouterProcess) -> None:
    with router.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)


def test_upstream_refused_is_502(start_router) -> None:
    router = start_router({"OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}", "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY})
    with router.http() as http:
        for stream in (False, True):
            err = assert_error(http.post("/v1/chat/completions",
                                         json={"model": "gpt-4o", "messages": MSG, "stream": stream}), 502)
            assert err["code"] == "upstream_unreachable" and UPSTREAM_KEY not in err["message"]


@pytest.mark.parametrize("retries", [0, 1])
def test_upstream_timeout_is_504(start_router, stub: OpenAIStub, retries: int) -> None:
    """UPSTREAM_TIMEOUT bounds each attempt (the stub sleeps 3 s): one attempt, or a second one after a
    backoff of at most 0.25 s when retries are on (the group has no other deployment)."""
    router = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "UPSTREAM_TIMEOUT": "1",
                           "ROUTER_NUM_RETRIES": str(retries)})
    started = time.monotonic()
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-slow", "messages": MSG})
    assert_error(resp, 504, code="upstream_timeout")
    assert resp.headers["x-router-attempts"] == str(1 + retries)
    assert time.monotonic() - started < 1.9 + retries * 1.25


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 503])
def test_upstream_status_and_message_are_kept_and_keys_stripped(router: RouterProcess, stub: OpenAIStub,
                                                                status: int) -> None:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": f"gpt-error-{status}", "messages": MSG})
    err = assert_error(resp, status)
    assert err["message"].startswith("Upstream refused (key used: ")
    assert UPSTREAM_KEY not in resp.text and "[redacted]" in err["message"]
    assert err["code"] == "upstream_says_no" and err["param"] == "model"
    if status == 429:
        assert resp.headers["retry-after"] == "7"


def test_sdk_raises_typed_errors(router: RouterProcess, stub: OpenAIStub) -> None:
    client = router.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope-model", messages=MSG)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-error-429", messages=MSG)


@pytest.mark.parametrize("model, code", [("gpt-midstream-fail", "upstream_error"),
                                         ("gpt-truncated", "upstream_stream_truncated")])
def test_upstream_failing_mid_stream_ends_with_an_error_event(router: RouterProcess, stub: OpenAIStub,
                                                              model: str, code: str) -> None:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": model, "messages": MSG, "stream": True})
    assert resp.status_code == 200
    events = [e for e in resp.content.split(b"\n\n") if e.strip()]
    assert all(e.startswith(b"data: ") for e in events)
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == code and last["error"]["type"] == "server_error"
    for e in events[:-1]:
        assert_valid("CreateChatCompletionStreamResponse", orjson.loads(e.removeprefix(b"data: ")))
    # the SDK surfaces it as an error rather than a silently short answer
    with pytest.raises(openai.APIError):
        for _ in router.client().chat.completions.create(model=model, messages=MSG, stream=True):
            pass


def in_flight(router: RouterProcess) -> float:
    with router.http() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("router_requests_in_flight "):
                return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def test_client_disconnect_cancels_the_upstream_request(router: RouterProcess, stub: OpenAIStub) -> None:
    with router.http() as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "gpt-drip", "messages": MSG, "stream": True}) as resp:
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    break
    # the client hung up after 3 of ~200 chunks: the router must drop the upstream too
    assert stub.client_gone.wait(5), "upstream kept streaming to a router whose client left"
    assert stub.chunks_sent < 100
    assert wait_for(lambda: in_flight(router) == 0, 3)
    with router.http() as http:  # and keeps serving
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG}).status_code == 200
