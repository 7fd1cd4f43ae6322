"""Graceful shutdown (router/shutdown.py): SIGTERM to a real `router serve`, with a stream in flight.

The upstream stream is `gpt-gated` (one chunk, then it waits for the stub's gate), so a test holds it open for
exactly as long as it needs: no sleeps, every wait bounded."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub
from tests.support.processes import RouterProcess

MSG = [{"role": "user", "content": "hi"}]
DRAINING = "Waiting for connections to close"  # uvicorn's line once its listener is closed and it waits


def router_env(stub: OpenAIStub, delay: float, grace: float) -> dict[str, str]:
    return {"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "LOCAL_AGENT_URL": "",
            "SHUTDOWN_DELAY": str(delay), "SHUTDOWN_GRACE_PERIOD": str(grace)}


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def refuses(port: int) -> bool:
    """A new connection to the router's port is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


class Call(threading.Thread):
    """One request in a thread: its status, headers and body lines (a stream's `data:` lines as they come)."""

    def __init__(self, url: str, model: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.stream = url, model, stream
        self.status = 0
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()  # the answer's head, and for a stream its first event, arrived

    def run(self) -> None:
        try:
            with httpx.Client(timeout=20) as http, http.stream(
                    "POST", self.url + "/v1/chat/completions",
                    json={"model": self.model, "messages": MSG, "stream": self.stream}) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 (the test asserts on it)
            self.error = exc
        finally:
            self.started.set()

    def events(self) -> list[bytes]:
        return [line.removeprefix("data: ").encode() for line in self.lines if line.startswith("data: ")]


def exit_code(router: RouterProcess, timeout: float) -> int | None:
    assert router.proc is not None
    try:
        return router.proc.wait(timeout)
    except Exception:  # noqa: BLE001 (TimeoutExpired: the test fails on None)
        return None


@pytest.fixture()
def gated(stub: OpenAIStub) -> Iterator[OpenAIStub]:
    slow_seconds = stub.slow_seconds
    yield stub
    stub.gate.set()  # never leave the stub's handler waiting on a gate
    stub.slow_seconds = slow_seconds


def test_sigterm_drains_a_stream_in_flight(start_router: Callable[..., RouterProcess],
                                           gated: OpenAIStub) -> None:
    delay = 1.5
    router = start_router(router_env(gated, delay, grace=20))
    assert router.proc is not None
    with httpx.Client(base_url=router.url, timeout=5) as kept:  # one keep-alive connection, used before and after
        assert kept.get("/ready").status_code == 200
        call = Call(router.url, "gpt-gated", stream=True)
        call.start()
        assert call.started.wait(10) and call.events(), call.error

        os.kill(router.proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        ready = kept.get("/ready")  # the connection kept alive answers, and says it closes
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "shutting_down"
        assert ready.headers["connection"] == "close"
        health = httpx.get(router.url + "/health", timeout=5)  # during the delay a new connection is served
        assert health.status_code == 200 and health.headers["connection"] == "close"
    assert time.monotonic() - signalled < delay, "the checks above did not fit in the delay"

    assert wait_for(lambda: refuses(router.port), delay + 3), "the listener stayed open after the delay"
    assert time.monotonic() - signalled >= delay - 0.1, "connections were refused before the delay was over"
    assert wait_for(lambda: DRAINING in router.output(), 3)  # uvicorn waits on the connections: the stream's
    assert router.running and call.is_alive(), "the stream in flight was not waited for"

    gated.gate.set()  # the upstream finishes the stream
    call.join(10)
    assert call.error is None and call.status == 200
    assert call.events()[-1] == b"[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or "" for e in call.events()[:-1]
                   if orjson.loads(e)["choices"])
    assert text == gated.reply_text()
    assert exit_code(router, 10) == 0
    assert "Exception in ASGI application" not in router.output()


def test_grace_period_cuts_what_is_still_running(start_router: Callable[..., RouterProcess],
                                                 gated: OpenAIStub) -> None:
    grace = 1.0
    gated.slow_seconds = 8  # the non-streaming call would answer long after the grace period
    router = start_router(router_env(gated, delay=0, grace=grace))
    assert router.proc is not None
    stream = Call(router.url, "gpt-gated", stream=True)  # the gate is never opened
    slow = Call(router.url, "gpt-slow", stream=False)
    stream.start()
    slow.start()
    assert stream.started.wait(10) and stream.events(), stream.error
    assert wait_for(lambda: len(gated.requests) >= 2, 5), "the slow request never reached the upstream"

    os.kill(router.proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    code = exit_code(router, grace + 10)
    took = time.monotonic() - signalled
    assert code == 0
    assert grace - 0.1 <= took < grace + 1.5, f"exited {took:.2f}s after SIGTERM with a grace period of {grace}s"

    stream.join(5)
    slow.join(5)
    last = orjson.loads(stream.events()[-1])  # the stream ends with an error event, not mid-air
    assert last["error"]["code"] == "shutting_down", stream.lines
    assert stream.error is None  # and its body ended properly (chunked terminator), not a reset
    assert slow.status == 503 and slow.error is None
    assert orjson.loads("".join(slow.lines))["error"]["code"] == "shutting_down"
    assert "Exception in ASGI application" not in router.output()
    assert "cut 2 request(s)" in router.output()


@pytest.mark.parametrize("workers", [1, 2])
def test_second_signal_exits_at_once(start_router: Callable[..., RouterProcess], gated: OpenAIStub,
                                     workers: int) -> None:
    router = start_router(router_env(gated, delay=30, grace=30), workers=workers)
    assert router.proc is not None
    call = Call(router.url, "gpt-gated", stream=True)
    call.start()
    assert call.started.wait(10) and call.events(), call.error
    os.kill(router.proc.pid, signal.SIGTERM)
    assert wait_for(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 503, 2)
    os.kill(router.proc.pid, signal.SIGTERM)
    assert exit_code(router, 3) == 0, "a second SIGTERM did not stop the router at once"
    assert "second stop signal" in router.output()


def test_sigint_skips_the_delay(start_router: Callable[..., RouterProcess], gated: OpenAIStub) -> None:
    router = start_router(router_env(gated, delay=30, grace=30))
    assert router.proc is not None
    os.kill(router.proc.pid, signal.SIGINT)  # Ctrl+C: nobody's load balancer to wait for
    assert exit_code(router, 5) == 0


def test_workers_each_drain_their_streams(start_router: Callable[..., RouterProcess], gated: OpenAIStub) -> None:
    delay = 1.0
    router = start_router(router_env(gated, delay, grace=20), workers=2)
    assert router.proc is not None
    calls = [Call(router.url, "gpt-gated", stream=True) for _ in range(4)]  # over two workers, most likely both
    for call in calls:
        call.start()
    for call in calls:
        assert call.started.wait(10) and call.events(), call.error

    os.kill(router.proc.pid, signal.SIGTERM)  # the supervisor only, as Kubernetes does
    signalled = time.monotonic()
    # the supervisor passes the signal on as it comes (uvicorn's would at its next half-second poll)
    assert wait_for(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 503, 0.3)
    for _ in range(4):  # whichever worker answers, it is draining
        assert httpx.get(router.url + "/ready", timeout=5).status_code == 503
    assert wait_for(lambda: refuses(router.port), delay + 3), "the listener stayed open after the delay"
    assert time.monotonic() - signalled >= delay - 0.1
    assert wait_for(lambda: DRAINING in router.output(), 3)  # uvicorn waits on the connections: streams open
    assert router.running and all(call.is_alive() for call in calls)

    gated.gate.set()
    for call in calls:
        call.join(10)
        assert call.error is None and call.status == 200
        assert call.events()[-1] == b"[DONE]"
    assert exit_code(router, 10) == 0
    assert "Exception in ASGI application" not in router.output()
