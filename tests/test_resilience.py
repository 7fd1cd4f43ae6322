"""Resilience end to end over real HTTP: router processes whose deployments (registered with the CLI) are
fault-injecting upstreams on loopback (`FaultStub`); each failure class, failover before the first byte for
streams and non-streams (context-length fallbacks included), the attempt budget, all-fail and mid-stream
errors, ejection and its probe, ejections shared through Redis, OpenRouter's `models` list, and a client that
leaves cancelling the upstream call. The keep-alive race is in test_upstream_hardening.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.support.fault_stub import FaultStub, closed_port_url
from tests.support.openai_stub import wait_for
from tests.support.processes import RouterProcess, run_cli

MSG = [{"role": "user", "content": "hi"}]
#: no cache (the same request is sent again on purpose), no cost rule, no agent
BASE_ENV = {"LOCAL_AGENT_URL": "", "ROUTER_COST_THRESHOLD": "0", "CACHE_MODE": "off"}
#: OpenRouter's `provider.order`: the failing deployment is tried first whenever it is available
BAD_FIRST: dict[str, Any] = {"provider": {"order": ["bad", "good"]}}

StartRouter = Callable[..., RouterProcess]


@pytest.fixture()
def stubs() -> Iterator[Callable[..., FaultStub]]:
    """Start FaultStubs; every one is released and stopped after the test."""
    started: list[FaultStub] = []

    def start(name: str, **kwargs: Any) -> FaultStub:
        stub = FaultStub(name, **kwargs).start()
        started.append(stub)
        return stub

    yield start
    for stub in started:
        stub.release()
        stub.stop()


def cli(workdir: Path, *args: str) -> str:
    done = run_cli(workdir, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def deploy(workdir: Path, model: str, name: str, url: str, *options: str) -> None:
    """`router add-model MODEL openai URL api --name NAME ...`, before the router starts (it reads it then)."""
    cli(workdir, "add-model", model, "openai", url, "api", "--name", name, *options)


def pair(tmp_path: Path, bad_url: str, good: FaultStub, *bad_options: str, model: str = "shared") -> None:
    deploy(tmp_path, model, "bad", bad_url, *bad_options)
    deploy(tmp_path, model, "good", good.url)


def chat(http: httpx.Client, model: str = "shared", **extra: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MSG, **extra})


def events(body: str) -> list[Any]:
    """Every `data:` event of a stream, parsed ([DONE] as the string)."""
    return [orjson.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in body.splitlines() if line.startswith("data: ")]


def sdk_stream(router: RouterProcess, model: str = "shared", **extra: Any) -> tuple[str, Mapping[str, str]]:
    """The joined content deltas of a stream read with the official SDK, and the answer's headers."""
    raw = router.client().chat.completions.with_raw_response.create(
        model=model, messages=MSG, stream=True, extra_body=extra or None)  # type: ignore[arg-type]
    chunks: Any = raw.parse()  # a Stream[ChatCompletionChunk]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, raw.headers


def routed(resp: httpx.Response | Mapping[str, str]) -> tuple[str, str]:
    """`x-router-deployment` and `x-router-attempts` of an answer."""
    headers = resp.headers if isinstance(resp, httpx.Response) else resp
    return headers["x-router-deployment"], headers["x-router-attempts"]


# -- 1. each failure class ---------------------------------------------------------------------------------

#: failure name -> (FaultStub settings, `add-model` options of the failing deployment, stream)
MOVES: dict[str, tuple[dict[str, Any], tuple[str, ...], bool]] = {
    "refused": ({}, (), False),  # the failing deployment's URL is a closed port
    "refused-stream": ({}, (), True),
    "reset": ({"mode": "reset"}, (), False),
    "reset-stream": ({"mode": "reset"}, (), True),
    "hang-before-headers-stream": ({"mode": "hang"}, ("--first-token-timeout", "0.5"), True),
    "hang-before-headers": ({"mode": "hang"}, ("--timeout", "0.5"), False),
    "5xx-burst": ({"fail_next": 3, "fail_status": 503}, (), False),
    "5xx-burst-stream": ({"fail_next": 3, "fail_status": 500}, (), True),
    "429-retry-after": ({"mode": "429", "retry_after": "5"}, (), False),
    "529": ({"mode": "529"}, (), False),
}


@pytest.mark.parametrize("failure", list(MOVES))
def test_a_deployment_fault_moves_to_the_healthy_deployment(start_router: StartRouter, stubs, tmp_path: Path,
                                                            failure: str) -> None:
    faults, options, stream = MOVES[failure]
    bad, good = stubs("bad").set(**faults), stubs("good")
    pair(tmp_path, closed_port_url() if failure.startswith("refused") else bad.url, good, *options)
    router = start_router(BASE_ENV)
    with router.http() as http:
        started = time.monotonic()
        resp = chat(http, stream=stream, **BAD_FIRST)
        took = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        assert routed(resp) == ("good", "2")
        if stream:
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events(resp.text)
                           if e != "[DONE]" and e["choices"]) == "Hello from good"
        else:
            assert resp.json()["choices"][0]["message"]["content"] == "Hello from good"
        assert (bad.received, good.received) == (0 if failure.startswith("refused") else 1, 1)
        assert took < (2.5 if "hang" in failure else 1.5)  # a hang costs its own timeout (0.5 s), no more
        if failure in ("429-retry-after", "529"):  # busy: cooled (Retry-After 5 s, else 1 s), not tried again
            again = chat(http, **BAD_FIRST)
            assert routed(again) == ("good", "1") and bad.received == 1


@pytest.mark.parametrize("status, stream", [(400, False), (401, False), (404, False), (422, False), (400, True)])
def test_a_client_mistake_is_answered_once_with_the_upstream_status(start_router: StartRouter, stubs,
                                                                     tmp_path: Path, status: int,
                                                                     stream: bool) -> None:
    bad, good = stubs("bad").set(fail_next=1, fail_status=status), stubs("good")
    pair(tmp_path, bad.url, good)
    router = start_router(BASE_ENV)
    with router.http() as http:
        resp = chat(http, stream=stream, **BAD_FIRST)
    assert resp.status_code == status and resp.headers["content-type"].startswith("application/json")
    assert routed(resp) == ("bad", "1")
    assert resp.json()["error"]["message"]
    assert (bad.received, good.received) == (1, 0)


# -- 2. failover before the first byte ---------------------------------------------------------------------

@pytest.mark.parametrize("faults", [
    {"mode": "error_stream", "chunks_before_fault": 1},  # a 200 stream: the role chunk, then an error event
    {"mode": "drop_mid_stream", "chunks_before_fault": 1},  # the role chunk, then a reset
    {"fail_next": 1, "fail_status": 502},
], ids=["error-event-in-200", "reset-after-role-chunk", "502"])
def test_a_stream_fails_over_before_its_first_content_cleanly(start_router: StartRouter, stubs, tmp_path: Path,
                                                              faults: dict[str, Any]) -> None:
    bad, good = stubs("bad").set(**faults), stubs("good")
    pair(tmp_path, bad.url, good)
    router = start_router(BASE_ENV)
    text, headers = sdk_stream(router, **BAD_FIRST)  # the SDK raises on an error event or a broken stream
    assert text == "Hello from good" and routed(headers) == ("good", "2")
    assert (bad.received, good.received) == (1, 1)
    with router.http() as http:  # the raw stream: one role chunk, nothing of the failed attempt
        bad.set(**faults)
        body = chat(http, stream=True, **BAD_FIRST).text
    assert body.count('"role":"assistant"') == 1 and "bad" not in body and '"error"' not in body
    assert body.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("stream", [True, False], ids=["in-a-200-stream", "json-400"])
def test_a_context_length_failure_goes_to_a_fallback_with_a_larger_window(
        start_router: StartRouter, stubs, tmp_path: Path, stream: bool) -> None:
    small = stubs("small").set(mode="context_length_stream" if stream else "context_length")
    same, large = stubs("same"), stubs("large")
    deploy(tmp_path, "small", "small-d", small.url, "--context-window", "4096")
    deploy(tmp_path, "same", "same-d", same.url, "--context-window", "4096")  # not larger: passed over
    deploy(tmp_path, "large", "large-d", large.url, "--context-window", "128000")
    cli(tmp_path, "set-fallbacks", "small", "same", "large")
    router = start_router(BASE_ENV)
    if stream:
        text, headers = sdk_stream(router, "small")
        assert text == "Hello from large"
    else:
        with router.http() as http:
            resp = chat(http, "small")
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "Hello from large"
        headers = resp.headers
    assert routed(headers) == ("large-d", "2")
    assert (small.received, same.received, large.received) == (1, 0, 1)


def test_a_context_length_failure_without_a_larger_fallback_is_the_clients_400(
        start_router: StartRouter, stubs, tmp_path: Path) -> None:
    small, same = stubs("small").set(mode="context_length_stream"), stubs("same")
    deploy(tmp_path, "small", "small-d", small.url, "--context-window", "4096")
    deploy(tmp_path, "small", "other-d", same.url, "--context-window", "4096")  # same group, same window
    router = start_router(BASE_ENV)
    with router.http() as http:
        resp = chat(http, "small", stream=True, provider={"order": ["small-d"]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert (small.received, same.received) == (1, 0)  # a too-long request is not the deployment's fault


# -- 3. the attempt budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_four_failing_deployments_take_exactly_three_attempts(start_router: StartRouter, stubs, tmp_path: Path,
                                                              stream: bool) -> None:
    statuses = (500, 502, 503, 504)
    failing = [stubs(f"d{i}").set(fail_next=100, fail_status=s) for i, s in enumerate(statuses)]
    for i, stub in enumerate(failing):
        deploy(tmp_path, "shared", f"d{i}", stub.url)
    router = start_router({**BASE_ENV, "ROUTER_NUM_RETRIES": "2"})
    with router.http() as http:
        resp = chat(http, stream=stream, provider={"order": ["d0", "d1", "d2", "d3"]})
    assert [s.received for s in failing] == [1, 1, 1, 0]  # 1 + ROUTER_NUM_RETRIES upstream requests in all
    assert resp.status_code == 503 and resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["message"].startswith("3 attempts failed") and all(f"d{i}" in error["message"] for i in range(3))
    assert resp.headers["x-router-attempts"] == "3"


# -- 4. all-fail for a stream ------------------------------------------------------------------------------

def test_a_stream_whose_every_attempt_fails_is_an_http_error(start_router: StartRouter, stubs,
                                                             tmp_path: Path) -> None:
    bad = stubs("bad").set(mode="error_stream", chunks_before_fault=1)
    hung = stubs("hung").set(mode="hang")
    deploy(tmp_path, "shared", "bad", bad.url)
    deploy(tmp_path, "shared", "hung", hung.url, "--first-token-timeout", "0.5")
    router = start_router(BASE_ENV)
    with router.http() as http:
        resp = chat(http, stream=True, provider={"order": ["bad", "hung"]})
    # every attempt failed before any content: an HTTP error naming each attempt, no 200 stream
    assert resp.status_code >= 500 and resp.headers["content-type"].startswith("application/json")
    message = resp.json()["error"]["message"]
    assert "deployment bad" in message and "deployment hung sent no first token" in message
    assert "data:" not in resp.text
    assert resp.headers["x-router-attempts"] == "2" and (bad.received, hung.received) == (1, 1)
    with pytest.raises(openai.APIStatusError) as raised:
        sdk_stream(router, provider={"order": ["bad", "hung"]})
    assert raised.value.status_code == resp.status_code


# -- 5. an error after the first token ---------------------------------------------------------------------

#: the content is relayed before the fault comes (arriving in one read, the fault would come before anything
#: was sent to the client, and the request would go elsewhere: test_a_stream_fails_over_before_...)
AFTER_CONTENT = {"chunks_before_fault": 3, "fault_delay": 0.2}


@pytest.mark.parametrize("faults, options", [
    ({"mode": "error_stream", **AFTER_CONTENT}, ()),
    ({"mode": "drop_mid_stream", **AFTER_CONTENT}, ()),
    ({"mode": "hang_mid_stream", **AFTER_CONTENT}, ("--idle-timeout", "0.5")),
], ids=["error-event", "reset", "idle-timeout"])
def test_an_error_after_the_first_token_ends_the_stream_with_an_error_event(
        start_router: StartRouter, stubs, tmp_path: Path, faults: dict[str, Any], options: tuple[str, ...]) -> None:
    bad, good = stubs("bad").set(**faults), stubs("good")
    pair(tmp_path, bad.url, good, *options)
    router = start_router(BASE_ENV)
    with router.http() as http:
        started = time.monotonic()
        resp = chat(http, stream=True, **BAD_FIRST)
        took = time.monotonic() - started
    assert resp.status_code == 200 and routed(resp) == ("bad", "1")
    got = events(resp.text)
    content = [e for e in got if "choices" in e]
    assert got[:3] == content  # what was sent before the failure, then only the error
    assert [e["choices"][0]["delta"].get("content") for e in content] == ["", "Hello", " from"]  # once each
    assert set(got[-1]) == {"error"} and got[-1]["error"]["message"]  # the last event: the error
    assert (bad.received, good.received) == (1, 0)  # nothing resent elsewhere
    assert took < 3


def test_an_upstream_error_event_after_content_is_relayed_as_the_one_final_event(
        start_router: StartRouter, stubs, tmp_path: Path) -> None:
    bad, good = stubs("bad").set(mode="error_stream", **AFTER_CONTENT), stubs("good")
    pair(tmp_path, bad.url, good)
    router = start_router(BASE_ENV)
    with router.http() as http:
        got = events(chat(http, stream=True, **BAD_FIRST).text)
    assert [e for e in got if "error" in e] == [got[-1]]


def test_an_upstream_that_holds_a_request_then_resets_gets_it_once(
        start_router: StartRouter, stubs, tmp_path: Path) -> None:
    bad, good = stubs("bad"), stubs("good")
    pair(tmp_path, bad.url, good)
    router = start_router(BASE_ENV)
    with router.http() as http:
        assert routed(chat(http, **BAD_FIRST)) == ("bad", "1")  # the router's pool keeps that connection
        bad.set(mode="hang", hang_seconds=0.5)  # it reads the request, works 0.5 s, then resets: not the
        resp = chat(http, **BAD_FIRST)  # keep-alive race (a close as the request goes out)
    assert routed(resp) == ("good", "2")
    assert bad.received == 2  # one attempt: one request


# -- 6. ejection, the probe and the return -----------------------------------------------------------------

def test_ejection_then_one_probe_then_traffic_returns(start_router: StartRouter, stubs, tmp_path: Path) -> None:
    bad, good = stubs("bad").set(fail_next=1000, fail_status=503), stubs("good")
    pair(tmp_path, bad.url, good, "--timeout", "0.6")
    base = 1.0  # the k-th ejection lasts at most base x 2^(k-1) s (jitter only shortens it)
    router = start_router({**BASE_ENV, "ROUTER_BREAKER_FAILURES": "2", "ROUTER_BREAKER_BASE_EJECTION": str(base)})
    started = time.monotonic()
    with router.http() as http:
        first = [chat(http, **BAD_FIRST) for _ in range(2)]
        assert [routed(r) for r in first] == [("good", "2")] * 2 and bad.received == 2
        ejected = [chat(http, **BAD_FIRST) for _ in range(5)]  # ejected: not tried, though it comes first
        assert [routed(r) for r in ejected] == [("good", "1")] * 5 and bad.received == 2

        time.sleep(base + 0.1)  # the ejection is over: half-open, one probe at a time
        bad.set(mode="hang", fail_next=0)  # the probe hangs past its deployment's 0.6 s timeout: a failure
        answers: list[httpx.Response] = []

        def one() -> None:
            with router.http() as own:
                answers.append(chat(own, **BAD_FIRST))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(answers) == 6 and all(routed(a)[0] == "good" for a in answers)
        assert bad.received == 3  # exactly one probe among six requests
        assert sorted(routed(a)[1] for a in answers) == ["1"] * 5 + ["2"]

        bad.set(mode=None)  # healthy again; the second ejection (at most 2 x base) must end first
        assert [routed(chat(http, **BAD_FIRST)) for _ in range(3)] == [("good", "1")] * 3 and bad.received == 3
        time.sleep(2 * base + 0.1)
        back = [chat(http, **BAD_FIRST) for _ in range(3)]  # the probe succeeds: the circuit closes
        assert [routed(r) for r in back] == [("bad", "1")] * 3 and bad.received == 6
    assert time.monotonic() - started < 15


# -- 7. ejections shared through Redis ---------------------------------------------------------------------

def test_an_ejection_through_one_router_is_honoured_by_two_others_within_a_second(
        start_router: StartRouter, stubs, tmp_path: Path, redis_server) -> None:
    bad, good = stubs("bad"), stubs("good")
    pair(tmp_path, bad.url, good)
    env = {**BASE_ENV, "REDIS_URL": redis_server.url, "ROUTER_BREAKER_FAILURES": "2",
           "ROUTER_BREAKER_BASE_EJECTION": "30"}
    a, b, c = (start_router(env) for _ in range(3))  # one registry (the same work folder), one Redis
    clients = {r: r.http() for r in (a, b, c)}
    try:
        for r in (b, c):  # healthy: B and C send to it first
            assert routed(chat(clients[r], **BAD_FIRST)) == ("bad", "1")
        bad.set(fail_next=1000, fail_status=503)
        assert [routed(chat(clients[a], **BAD_FIRST)) for _ in range(2)] == [("good", "2")] * 2
        assert bad.received == 4  # two through B and C, two failures through A: ejected by A
        time.sleep(1.0)
        for r in (b, c, b, c, b, c):
            assert routed(chat(clients[r], **BAD_FIRST)) == ("good", "1")
        assert bad.received == 4 and good.received == 8  # flat at the ejected deployment
    finally:
        for http in clients.values():
            http.close()


# -- 8. OpenRouter's `models` ------------------------------------------------------------------------------

def test_models_list_falls_to_the_next_model_within_the_keys_allowed_models(
        start_router: StartRouter, stubs, tmp_path: Path) -> None:
    first, second = stubs("first").set(fail_next=1000, fail_status=503), stubs("second")
    deploy(tmp_path, "first", "first-d", first.url)
    deploy(tmp_path, "second", "second-d", second.url)
    both = cli(tmp_path, "create-key", "--name", "both", "--models", "first,second").strip()
    only_first = cli(tmp_path, "create-key", "--name", "one", "--models", "first").strip()
    router = start_router(BASE_ENV)
    with router.http() as http:
        resp = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {both}"},
                         json={"models": ["first", "second"], "messages": MSG})
        assert resp.status_code == 200, resp.text
        assert routed(resp) == ("second-d", "2") and resp.json()["model"] == "second"
        sent = second.requests[-1].json()
        assert sent["model"] == "second" and "models" not in sent
        denied = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {only_first}"},
                           json={"model": "first", "models": ["first", "second"], "messages": MSG})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert (first.received, second.received) == (1, 1)  # refused before any upstream request


# -- 9. a client that leaves a non-streaming request -------------------------------------------------------

def test_a_client_that_disconnects_cancels_the_upstream_call(start_router: StartRouter, stubs,
                                                             tmp_path: Path) -> None:
    hung = stubs("hung").set(mode="hang", hang_seconds=30)
    deploy(tmp_path, "shared", "hung", hung.url)
    router = start_router(BASE_ENV)
    with httpx.Client(base_url=router.url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        chat(http)
    left = time.monotonic()  # the client's connection is closed
    assert hung.received == 1
    assert wait_for(hung.client_gone.is_set, 1.0), "the upstream call outlived its client"
    assert time.monotonic() - left < 1.0 and hung.abandoned == 1
    hung.set(mode=None)
    with router.http() as http:
        assert chat(http).status_code == 200
