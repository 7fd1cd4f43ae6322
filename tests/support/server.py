"""A real aiohttp server on loopback in a background thread: the base of every
upstream stub. It records what it receives for the test to inspect. Also a raw
HTTP/1.1 upstream whose keep-alive connections close as they are reused."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: bytes
    peer: tuple[str, int]

    def json(self) -> Any:
        return orjson.loads(self.body)


class ThreadedServer(ABC):
    name = "stub"

    #: seconds an idle keep-alive connection stays open (aiohttp's default; uvicorn's is 5)
    keepalive_timeout = 3630.0

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.violations: list[str] = []
        self.port = 0

    @abstractmethod
    def routes(self, app: web.Application) -> None:
        """Add the stub's handlers to `app`."""

    def start(self) -> Any:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name=f"stub-{self.name}")
        self._thread.start()
        assert ready.wait(10), "stub did not start"
        return self

    def _serve(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     keepalive_timeout=self.keepalive_timeout)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, request: web.Request, body: bytes) -> Received:
        peer = request.transport.get_extra_info("peername") if request.transport else ("?", 0)
        received = Received(request.path, dict(request.query), CIMultiDict(request.headers), body, tuple(peer[:2]))
        self.requests.append(received)
        return received

    def reset(self) -> None:
        self.requests.clear()
        self.violations.clear()

    def last(self) -> Received:
        assert self.requests, f"stub {self.name} received no request"
        return self.requests[-1]


async def sse_response(request: web.Request, events: list[bytes], *, abort_after: int | None = None,
                       headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Write `events` one by one; with `abort_after`, drop the connection after that many."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       **(headers or {})})
    await resp.prepare(request)
    for i, event in enumerate(events):
        if abort_after is not None and i == abort_after:
            request.transport.abort()  # type: ignore[union-attr]
            return resp
        await resp.write(event)
    await resp.write_eof()
    return resp


class ClosingKeepAliveServer:
    """A raw HTTP/1.1 chat upstream on loopback that answers the first request on each connection (keeping it
    alive) and closes the connection, unanswered, when the next request arrives on it.

    That is an upstream closing an idle keep-alive connection just as the client reuses it, with the race made
    certain. `reset=True` closes with a TCP RST instead of a FIN; `answer=0` drops every request, on fresh
    connections too. Counts are read by the test."""

    def __init__(self, reset: bool = False, answer: int = 1) -> None:
        self.reset = reset
        self.answer = answer
        self.port = 0
        self.connections = 0
        self.answered = 0
        self.dropped = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ClosingKeepAliveServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="stub-closing")
        self._thread.start()
        assert ready.wait(10), "stub did not start"
        return self

    def _serve(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = orjson.loads(await reader.readexactly(length))
                if served >= self.answer:  # the request arrived whole; it is dropped unanswered
                    self.dropped += 1
                    if self.reset:
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                   struct.pack("ii", 1, 0))
                    break
                served += 1
                self.answered += 1
                writer.write(self._answer(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _answer(body: dict[str, Any]) -> bytes:
        model = body.get("model", "?")
        if body.get("stream"):
            chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "fresh"},
                                  "finish_reason": "stop", "logprobs": None}]}
            payload = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
            kind = b"text/event-stream"
        else:
            payload = orjson.dumps({
                "id": "chatcmpl-raw", "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fresh"},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            kind = b"application/json"
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nContent-Length: " + str(len(payload)).encode()
                + b"\r\nConnection: keep-alive\r\n\r\n" + payload)
