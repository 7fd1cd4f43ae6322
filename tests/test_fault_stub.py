"""The fault-injecting upstream does what each of its modes says, over real HTTP (aiohttp), and what it
produces is what `router.routing.failures` classifies as the matching failure."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from router.routing import failures as f
from tests.support.fault_stub import FaultStub, closed_port_url

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@pytest.fixture(scope="module")
def shared() -> Iterator[FaultStub]:
    stub = FaultStub().start()
    yield stub
    stub.release()
    stub.stop()


@pytest.fixture()
def stub(shared: FaultStub) -> FaultStub:
    return shared.clear()


async def post(url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=timeout or aiohttp.ClientTimeout(total=10)) as session, \
            session.post(url + "/v1/chat/completions", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def raised(coro: Any) -> BaseException:
    async def go() -> BaseException:
        try:
            await coro
        except BaseException as exc:  # noqa: BLE001 - the exception is the result
            return exc
        raise AssertionError("no exception")

    return asyncio.run(go())


def test_normal_answers_counts_and_the_control_endpoint(stub: FaultStub) -> None:
    status, _, body = run(post(stub.url, CHAT))
    assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"] == "Hello from faulty"
    status, _, body = run(post(stub.url, STREAM))
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")

    async def control() -> tuple[dict[str, Any], int]:
        async with aiohttp.ClientSession() as session:
            async with session.post(stub.url + "/_faults", json={"mode": "429", "retry_after": "4"}) as resp:
                state = await resp.json()
            async with session.post(stub.url + "/_faults", json={"mode": "bogus"}) as resp:
                return state, resp.status

    state, bad = run(control())
    assert (state["mode"], state["retry_after"], state["received"], state["answered"]) == ("429", "4", 2, 2)
    assert bad == 400 and stub.mode == "429"


def test_reset_before_any_answer(stub: FaultStub) -> None:
    stub.set(mode="reset")
    exc = raised(post(stub.url, CHAT))
    assert isinstance(f.from_exception(exc), f.ConnectionReset)
    assert stub.received == 1 and stub.faults["reset"] == 1


def test_hang_before_headers_until_released(stub: FaultStub) -> None:
    stub.set(mode="hang", hang_seconds=10.0)
    started = time.monotonic()
    exc = raised(post(stub.url, CHAT, aiohttp.ClientTimeout(total=10, sock_read=0.3)))
    assert isinstance(f.from_exception(exc), f.FirstByteTimeout)
    assert 0.3 <= time.monotonic() - started < 2.0

    async def released_later() -> BaseException:
        asyncio.get_running_loop().call_later(0.3, stub.release)
        try:
            await post(stub.url, CHAT)
        except BaseException as exc:  # noqa: BLE001
            return exc
        raise AssertionError("a hang ends with the connection closed, unanswered")

    started = time.monotonic()
    assert isinstance(f.from_exception(run(released_later())), f.ConnectionReset)
    assert time.monotonic() - started < 2.0


def read_stream(url: str, timeout: aiohttp.ClientTimeout) -> tuple[list[bytes], BaseException | None]:
    async def go() -> tuple[list[bytes], BaseException | None]:
        chunks: list[bytes] = []
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with session.post(url + "/v1/chat/completions", json=STREAM) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            chunks.append(line)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return chunks, exc
        return chunks, None

    return asyncio.run(go())


def test_hang_mid_stream_after_n_chunks(stub: FaultStub) -> None:
    stub.set(mode="hang_mid_stream", chunks_before_fault=2, hang_seconds=10.0)
    chunks, exc = read_stream(stub.url, aiohttp.ClientTimeout(total=10, sock_read=0.3))
    assert len(chunks) == 2 and orjson.loads(chunks[0][6:])["object"] == "chat.completion.chunk"
    assert isinstance(f.from_exception(exc or Exception(), during_stream=True), f.IdleStreamTimeout)


def test_drop_mid_stream_after_n_chunks(stub: FaultStub) -> None:
    stub.set(mode="drop_mid_stream", chunks_before_fault=3)
    chunks, exc = read_stream(stub.url, aiohttp.ClientTimeout(total=10))
    assert len(chunks) == 3 and exc is not None
    assert isinstance(f.from_exception(exc), f.ConnectionReset)


def test_a_5xx_burst_fails_exactly_the_next_k_requests(stub: FaultStub) -> None:
    stub.set(fail_next=3, fail_status=503)

    async def many() -> list[int]:
        return [(await post(stub.url, CHAT))[0] for _ in range(5)]

    assert run(many()) == [503, 503, 503, 200, 200]
    assert stub.faults == {"503": 3} and stub.received == 5


def test_a_seeded_share_of_requests_fails(stub: FaultStub) -> None:
    stub.set(fail_rate=0.3, seed=7)
    draws = random.Random(7)
    expected = [500 if draws.random() < 0.3 else 200 for _ in range(60)]

    async def many() -> list[int]:
        async with aiohttp.ClientSession() as session:
            out = []
            for _ in range(60):
                async with session.post(stub.url + "/v1/chat/completions", json=CHAT) as resp:
                    await resp.read()
                    out.append(resp.status)
            return out

    statuses = run(many())
    assert statuses == expected and 8 <= statuses.count(500) <= 30


@pytest.mark.parametrize("mode, status, cls", [("429", 429, f.RateLimited), ("529", 529, f.Overloaded),
                                               ("context_length", 400, f.ContextLengthExceeded)])
def test_error_answers(stub: FaultStub, mode: str, status: int, cls: type[f.UpstreamFailure]) -> None:
    stub.set(mode=mode, retry_after="3")
    got, headers, body = run(post(stub.url, CHAT))
    assert got == status
    failure = f.from_status(got, body, headers, "anthropic" if mode == "529" else "openai")
    assert type(failure) is cls
    if mode == "429":
        assert headers["Retry-After"] == "3" and failure.retry_after == 3.0


@pytest.mark.parametrize("mode, cls, chunks_first", [("context_length_stream", f.ContextLengthExceeded, 0),
                                                     ("error_stream", f.ServerError, 2)])
def test_errors_inside_a_200_stream(stub: FaultStub, mode: str, cls: type[f.UpstreamFailure],
                                    chunks_first: int) -> None:
    stub.set(mode=mode, chunks_before_fault=2)
    status, headers, body = run(post(stub.url, STREAM))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert [f.from_stream_event(e) for e in events[:chunks_first]] == [None] * chunks_first
    assert type(f.from_stream_event(events[chunks_first])) is cls


def test_refuse_and_accept_again_on_the_same_port(stub: FaultStub) -> None:
    assert isinstance(f.from_exception(raised(post(closed_port_url(), CHAT))), f.ConnectionRefused)
    stub.refuse()
    try:
        assert isinstance(f.from_exception(raised(post(stub.url, CHAT))), f.ConnectionRefused)
    finally:
        stub.accept()
    assert run(post(stub.url, CHAT))[0] == 200


def test_idle_keep_alive_connections_are_closed_after_a_second() -> None:
    stub = FaultStub(idle_close=1.0).start()
    try:
        body = orjson.dumps(CHAT)
        with socket.create_connection(("127.0.0.1", stub.port), timeout=5) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answer = b""
            while b"Hello from faulty" not in answer:
                answer += conn.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            idle_since = time.monotonic()
            assert conn.recv(1) == b""  # the stub closed the idle connection ...
            idle = time.monotonic() - idle_since
        assert 0.8 <= idle < 3.0  # ... after about a second
        assert stub.connections == 1
    finally:
        stub.stop()
