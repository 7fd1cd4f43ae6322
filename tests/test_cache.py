"""The response cache: in memory by default, Redis when configured."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid
from tests.test_observability import sample

X = [{"role": "user", "content": "What is 2+2?"}]


def upstream_env(stub: OpenAIStub, **extra: str) -> dict[str, str]:
    return {"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, **extra}


def post(router: RouterProcess, body: dict, headers: dict | None = None):
    with router.http() as http:
        return http.post("/v1/chat/completions", json=body, headers=headers or {})


def chat_requests(stub: OpenAIStub) -> int:
    return sum(1 for r in stub.requests if r.path.endswith("/chat/completions"))


def test_hit_is_served_without_the_upstream(start_router, stub: OpenAIStub) -> None:
    router = start_router(upstream_env(stub))
    body = {"model": "gpt-4o", "messages": X, "temperature": 0}
    first = post(router, body)
    assert first.headers["x-router-cache"] == "miss"
    assert wait_for(lambda: post(router, body).headers["x-router-cache"] == "hit", 3)
    second = post(router, body)
    assert second.headers["x-router-cache"] == "hit"
    assert second.json() == first.json()
    assert chat_requests(stub) == 1  # only the first one reached the upstream
    # fields that do not change the answer do not split the cache
    assert post(router, {**body, "user": "someone-else"}).headers["x-router-cache"] == "hit"
    assert post(router, {**body, "max_tokens": 5}).headers["x-router-cache"] == "miss"


def test_stream_is_recorded_and_replayed_and_crosses_modes(start_router, stub: OpenAIStub) -> None:
    router = start_router(upstream_env(stub))
    client = router.client()
    request = {"model": "gpt-tools", "messages": X, "temperature": 0, "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]}

    with client.chat.completions.stream(**request, stream_options={"include_usage": True}) as s:
        for _ in s:
            pass
        live = s.get_final_completion()
    assert chat_requests(stub) == 1

    # the same exchange, streamed again: replayed from the cache, and the SDK parses it
    def replayed():
        with client.chat.completions.stream(**request, stream_options={"include_usage": True}) as s:
            for _ in s:
                pass
            return s.get_final_completion()

    # the recorded stream is stored right after it ends, off the request's path: wait until it is
    with router.http() as http:
        assert wait_for(lambda: sample(http.get("/metrics").text, "router_cache_entries") == 1, 5)
    again = replayed()
    assert chat_requests(stub) == 1
    call_live, call_again = live.choices[0].message.tool_calls[0], again.choices[0].message.tool_calls[0]
    assert (call_again.id, call_again.function.name, call_again.function.arguments) == \
        (call_live.id, call_live.function.name, call_live.function.arguments)
    assert again.choices[0].finish_reason == "tool_calls" and again.usage == live.usage

    # every replayed chunk is a valid chunk, the usage chunk comes last, then [DONE]
    resp = post(router, {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["x-router-cache"] == "hit"
    events = [e.removeprefix(b"data: ") for e in resp.content.split(b"\n\n") if e.strip()]
    assert events[-1] == b"[DONE]"
    for e in events[:-1]:
        assert_valid("CreateChatCompletionStreamResponse", orjson.loads(e))
    assert orjson.loads(events[-2])["choices"] == []

    # and the non-streaming form of the same request is a hit from the recorded stream
    plain = post(router, request)
    assert plain.headers["x-router-cache"] == "hit"
    assert_valid("CreateChatCompletionResponse", plain.json())
    assert plain.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chat_requests(stub) == 1


@pytest.mark.parametrize("headers, body_extra, cached", [
    ({}, {}, False),  # no temperature: OpenAI's default is 1, so not deterministic
    ({}, {"temperature": 0.7}, False),
    ({"x-router-cache": "on"}, {"temperature": 0.7}, True),  # the request opts in
    ({}, {"temperature": 0}, True),
])
def test_which_requests_are_cached(start_router, stub: OpenAIStub, headers, body_extra, cached: bool) -> None:
    router = start_router(upstream_env(stub))
    body = {"model": "gpt-4o", "messages": X, **body_extra}
    post(router, body, headers)
    time.sleep(0.2)
    second = post(router, body, headers)
    assert (second.headers.get("x-router-cache") == "hit") is cached
    assert chat_requests(stub) == (1 if cached else 2)


def test_cache_mode_all_and_off(start_router, stub: OpenAIStub, tmp_path: Path) -> None:
    router = start_router(upstream_env(stub, CACHE_MODE="all"), workdir=tmp_path / "all")
    body = {"model": "gpt-4o", "messages": X, "temperature": 1.2}
    post(router, body)
    assert wait_for(lambda: post(router, body).headers.get("x-router-cache") == "hit", 3)
    stub.reset()
    off = start_router(upstream_env(stub, CACHE_MODE="off"), workdir=tmp_path / "off")
    for _ in range(2):
        assert "x-router-cache" not in post(off, {**body, "temperature": 0}).headers
    assert chat_requests(stub) == 2


def test_cache_control_directives(start_router, stub: OpenAIStub) -> None:
    router = start_router(upstream_env(stub))
    body = {"model": "gpt-4o", "messages": X, "temperature": 0}
    post(router, body, {"cache-control": "no-store"})  # answered, not stored
    time.sleep(0.2)
    assert post(router, body).headers["x-router-cache"] == "miss"  # so this one misses (and stores)
    time.sleep(0.2)
    assert post(router, body, {"cache-control": "no-cache"}).headers["x-router-cache"] == "miss"  # skips reading
    assert post(router, body).headers["x-router-cache"] == "hit"
    assert chat_requests(stub) == 3


@pytest.mark.parametrize("model, stream", [("gpt-error-500", False), ("gpt-error-429", True),
                                           ("gpt-midstream-fail", True), ("gpt-truncated", True)])
def test_failures_are_never_cached(start_router, stub: OpenAIStub, model: str, stream: bool) -> None:
    router = start_router({**upstream_env(stub), "ROUTER_NUM_RETRIES": "0"})  # one upstream call per request
    body = {"model": model, "messages": X, "temperature": 0, "stream": stream}
    for _ in range(3):
        post(router, body)
        time.sleep(0.1)
    assert chat_requests(stub) == 3


def test_no_cross_tenant_hits(start_router, stub: OpenAIStub, tmp_path: Path) -> None:
    router = start_router(upstream_env(stub))
    keys = [router.cli("create-key", "--name", name).stdout.strip() for name in ("tenant-a", "tenant-b")]
    assert all(k.startswith("sk-router-") for k in keys)
    body = {"model": "gpt-4o", "messages": X, "temperature": 0}

    def as_(key: str):
        return post(router, body, {"Authorization": f"Bearer {key}"})

    for key in keys:  # both keys loaded (each create-key is its own commit)
        assert wait_for(lambda k=key: post(router, {**body, "temperature": 0.5},
                                            {"Authorization": f"Bearer {k}"}).status_code == 200, 5)
    stub.reset()
    assert wait_for(lambda: as_(keys[0]).headers["x-router-cache"] == "hit", 3)
    assert as_(keys[1]).headers["x-router-cache"] == "miss"  # tenant B never reads tenant A's entry
    assert chat_requests(stub) == 2


def test_memory_cache_stays_within_its_bounds(start_router, stub: OpenAIStub) -> None:
    router = start_router(upstream_env(stub, CACHE_MAX_ENTRIES="5", CACHE_MAX_BYTES="2048"))
    for i in range(40):
        post(router, {"model": "gpt-4o", "messages": [{"role": "user", "content": f"question {i}"}],
                      "temperature": 0})
    with router.http() as http:
        text = http.get("/metrics").text
    assert 0 < sample(text, "router_cache_entries") <= 5
    assert 0 < sample(text, "router_cache_bytes") <= 2048
    # the most recent entry is still there
    last = post(router, {"model": "gpt-4o", "messages": [{"role": "user", "content": "question 39"}],
                         "temperature": 0})
    assert last.headers["x-router-cache"] == "hit"


def test_redis_cache_is_shared_between_routers(start_router, stub: OpenAIStub, redis_url: str,
                                               tmp_path: Path) -> None:
    env = upstream_env(stub, REDIS_URL=redis_url)
    a = start_router(env, workdir=tmp_path / "a")
    b = start_router(env, workdir=tmp_path / "b")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"shared {time.time()}"}], "temperature": 0}
    assert post(a, body).headers["x-router-cache"] == "miss"
    assert wait_for(lambda: post(b, body).headers["x-router-cache"] == "hit", 3)
    assert chat_requests(stub) == 1
    with b.client().chat.completions.stream(model="gpt-4o", messages=body["messages"], temperature=0) as s:
        text = "".join(e.delta for e in s if e.type == "content.delta")
    assert text == "Hello from openai" and chat_requests(stub) == 1


def test_redis_down_means_uncached_not_failed_and_recovers(start_router, stub: OpenAIStub, redis_server,
                                                           tmp_path: Path) -> None:
    router = start_router(upstream_env(stub, REDIS_URL=redis_server.url, REDIS_RETRY_AFTER="1"))
    body = {"model": "gpt-4o", "messages": X, "temperature": 0}
    post(router, body)
    assert wait_for(lambda: post(router, body).headers["x-router-cache"] == "hit", 3)
    redis_server.stop()
    started = time.monotonic()
    for _ in range(20):  # Redis is gone: every request still succeeds, uncached
        resp = post(router, body)
        assert resp.status_code == 200 and resp.headers["x-router-cache"] == "miss"
    assert time.monotonic() - started < 10
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "router_redis_up") == 0 and sample(text, "router_redis_errors_total") >= 1
    assert "redis unavailable" in (tmp_path / "logs" / "router.log").read_text()
    redis_server.start()  # same port: caching resumes without a restart
    assert wait_for(lambda: post(router, body).headers["x-router-cache"] == "hit", 10)
    assert "redis is back" in (tmp_path / "logs" / "router.log").read_text()
