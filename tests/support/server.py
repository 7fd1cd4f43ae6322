"""A real aiohttp server on loopback in a background thread: the base of every
upstream stub. It records what it receives for the test to inspect."""

from __future__ import annotations

import asyncio
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
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
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
