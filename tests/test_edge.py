"""The server edge: request heads that trickle or never come are closed in time; connections are bounded."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack

import httpx
import orjson
import pytest

from tests.support.processes import RouterProcess

MSG = [{"role": "user", "content": "hi"}]
CHAT = orjson.dumps({"model": "dummy", "messages": MSG})


def connect(router: RouterProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=5)
    sock.settimeout(5)
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the router sends until it closes the connection, and when it closed (seconds from now)."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    assert len(body) == length
    return head


def chat_ok(router: RouterProcess) -> bool:
    with httpx.Client(base_url=router.url, timeout=5) as http:
        return http.post("/v1/chat/completions", content=CHAT).status_code == 200


@pytest.fixture()
def edge_router(start_router) -> RouterProcess:
    return start_router({"REQUEST_HEADER_TIMEOUT": "1"})  # type: ignore[no-any-return]


def test_a_stalled_request_line_gets_408_and_is_closed(edge_router: RouterProcess) -> None:
    with connect(edge_router) as sock:
        sock.sendall(b"POST /v1/chat/compl")
        data, after = read_until_closed(sock, 5)
    assert after < 2.5
    status, _, rest = data.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert chat_ok(edge_router)


def test_trickled_headers_are_closed_even_while_bytes_keep_coming(edge_router: RouterProcess) -> None:
    """The deadline is for the whole head, not between bytes (slowloris)."""
    with connect(edge_router) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 4:
            try:
                sock.sendall(b"X-a: b\r\n")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        assert closed, "the router kept a trickling head open"
        assert time.monotonic() - started < 2.5


def test_a_connection_that_sends_nothing_is_closed_silently(edge_router: RouterProcess) -> None:
    with connect(edge_router) as sock:
        data, after = read_until_closed(sock, 5)
    assert data == b"" and after < 2.5


def test_a_kept_alive_connection_gets_a_new_deadline_per_request(edge_router: RouterProcess) -> None:
    """Requests on one connection spaced wider than the timeout are served; a later stalled head is closed."""
    with connect(edge_router) as sock:
        for _ in range(2):
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(CHAT), CHAT))
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1.3)  # idle between requests: the keep-alive timeout's business, not the head's
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        data, after = read_until_closed(sock, 5)
    assert data.startswith(b"HTTP/1.1 408") and after < 2.5


def test_many_stalled_connections_are_all_closed_and_others_served(edge_router: RouterProcess) -> None:
    with ExitStack() as stack:
        stalled = [stack.enter_context(connect(edge_router)) for _ in range(200)]
        for sock in stalled:
            sock.sendall(b"GET /v1/mod")
        assert chat_ok(edge_router)  # served while they stall
        time.sleep(2)
        for sock in stalled:
            data, after = read_until_closed(sock, 2)
            assert data.startswith(b"HTTP/1.1 408")
    assert chat_ok(edge_router)


def test_connections_beyond_the_limit_get_503(start_router) -> None:
    router = start_router({"ROUTER_MAX_CONNECTIONS": "4"})
    with ExitStack() as stack:
        held = [stack.enter_context(connect(router)) for _ in range(4)]
        time.sleep(0.2)
        with httpx.Client(base_url=router.url, timeout=5) as http:  # the fifth connection
            assert http.post("/v1/chat/completions", content=CHAT).status_code == 503
        for sock in held[1:]:
            sock.close()
        time.sleep(0.2)
        assert chat_ok(router)  # two connections open: the held one and this one


def test_every_worker_applies_the_timeout(start_router) -> None:
    router = start_router({"REQUEST_HEADER_TIMEOUT": "1"}, workers=2)
    with ExitStack() as stack:
        stalled = [stack.enter_context(connect(router)) for _ in range(16)]  # the kernel spreads them
        for sock in stalled:
            sock.sendall(b"GET /heal")
        for sock in stalled:
            data, after = read_until_closed(sock, 5)
            assert data.startswith(b"HTTP/1.1 408") and after < 2.5
