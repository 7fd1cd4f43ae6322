"""A fault-injecting OpenAI-compatible upstream on loopback: the `OpenAIStub` (its answers, chunk format and
model-name behaviours) with failures switched on and off at run time, per instance.

Faults, as attributes (`stub.set(...)`) or through `POST /_faults` with the same names as JSON (`GET /_faults`
reads them back with the counters):

  mode            what every request gets, until changed:
                    None                   a normal answer
                    "reset"                the connection is reset (TCP RST) once the request has arrived
                    "hang"                 nothing at all (no head) for `hang_seconds`, or until `release()`
                    "hang_mid_stream"      a stream's first `chunks_before_fault` chunks, then silence
                    "drop_mid_stream"      a stream's first `chunks_before_fault` chunks, then a reset
                    "429"                  429 with `Retry-After: <retry_after>` and OpenAI's rate-limit body
                    "529"                  Anthropic's 529 `overloaded_error`
                    "context_length"       400 with OpenAI's `context_length_exceeded` body
                    "context_length_stream"  a 200 stream whose first event is that error (then [DONE])
                    "error_stream"         a 200 stream: `chunks_before_fault` chunks, then a server error event
  fail_next       the next K requests are answered `fail_status` (default 500): a 5xx burst; before `mode`
  fail_rate       this share of requests is answered `fail_status`, drawn from `random.Random(seed)`
  fault_delay     seconds the *_stream modes wait after their first chunks before the fault (default 0)
  refuse()        stop listening (connections are refused) until `accept()` listens again on the same port

`idle_close` (constructor): seconds an idle keep-alive connection stays open before the stub closes it (1 s
models llama.cpp and uvicorn closing theirs; None: aiohttp's default). Counters: `received` (chat requests
that arrived, faulty or not), `answered` (normal answers), `faults` (by name), `connections` (distinct client
connections seen), `abandoned` (hangs whose client closed the connection; each also sets `client_gone`).
`closed_port_url()` is a loopback URL nothing listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from tests.support.openai_stub import OpenAIStub
from tests.support.processes import free_port

MODES = (None, "reset", "hang", "hang_mid_stream", "drop_mid_stream", "429", "529", "context_length",
         "context_length_stream", "error_stream")
SETTABLE = ("mode", "fail_next", "fail_status", "fail_rate", "seed", "retry_after", "hang_seconds",
            "chunks_before_fault", "fault_delay")

CONTEXT_ERROR = {"error": {"message": "This model's maximum context length is 4096 tokens. However, your messages "
                                      "resulted in 5000 tokens. Please reduce the length of the messages.",
                           "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
RATE_ERROR = {"error": {"message": "Rate limit reached for requests. Please try again later.", "type": "requests",
                        "param": None, "code": "rate_limit_exceeded"}}
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
SERVER_ERROR = {"error": {"message": "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": None}}


def closed_port_url() -> str:
    """A loopback URL with nothing listening: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


class FaultStub(OpenAIStub):
    def __init__(self, name: str = "faulty", *, idle_close: float | None = None, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(name=name, keepalive_timeout=idle_close, **kwargs)
        self.mode: str | None = None
        self.fail_next = 0
        self.fail_status = 500
        self.fail_rate = 0.0
        self.seed = seed
        self.rng = random.Random(seed)
        self.retry_after = "1"
        self.hang_seconds = 30.0
        self.chunks_before_fault = 2
        self.fault_delay = 0.0  # seconds a faulty stream waits after its first chunks, before its fault
        self._wake = asyncio.Event()  # set: every hang ends (used in the stub's loop only)
        self.received = 0
        self.answered = 0
        self.faults: Counter[str] = Counter()
        self.abandoned = 0
        self._peers: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    # -- control --------------------------------------------------------------------------

    def set(self, **faults: Any) -> FaultStub:
        """Switch faults (names as in the module doc); a new `seed` restarts the random draws."""
        with self._lock:
            for name, value in faults.items():
                if name not in SETTABLE:
                    raise ValueError(f"unknown fault setting {name!r}")
                if name == "mode" and value not in MODES:
                    raise ValueError(f"unknown mode {value!r}")
                setattr(self, name, value)
                if name == "seed":
                    self.rng = random.Random(value)
        self._in_loop(self._wake.clear)
        return self

    def clear(self) -> FaultStub:
        """No faults, counters at zero, hangs released (later ones hang again)."""
        self.release()
        self._in_loop(self._wake.clear)
        with self._lock:
            self.mode, self.fail_next, self.fail_status, self.fail_rate = None, 0, 500, 0.0
            self.rng = random.Random(self.seed)
            self.received = self.answered = self.abandoned = 0
            self.faults.clear()
            self._peers.clear()
        self.reset()
        return self

    def release(self) -> None:
        """End every hang now (the hung requests then close their connections)."""
        self._in_loop(self._wake.set)

    def _in_loop(self, call: Any) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(call)

    @property
    def connections(self) -> int:
        return len(self._peers)

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones are left alone)."""
        asyncio.run_coroutine_threadsafe(self._site.stop(), self.loop).result(10)

    def accept(self) -> None:
        """Listen again, on the same port."""
        async def listen() -> None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()

        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)

    def start(self) -> FaultStub:
        super().start()
        # the site ThreadedServer started: kept to stop and restart listening
        self._site = next(iter(self._runner.sites))  # type: ignore[assignment]
        return self

    def state(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in SETTABLE}, "received": self.received,
                "answered": self.answered, "faults": dict(self.faults), "connections": self.connections,
                "abandoned": self.abandoned}

    # -- serving ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_get("/_faults", self._get_faults)
        app.router.add_post("/_faults", self._set_faults)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("a JSON object of fault settings is expected")
            self.set(**changes)
        except (ValueError, TypeError) as exc:  # orjson's errors are ValueErrors
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        return web.json_response(self.state())

    def _draw(self) -> str | None:
        """The fault this request gets: a burst first, then the random share, then the mode."""
        with self._lock:
            self.received += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return "status"
            if self.fail_rate and self.rng.random() < self.fail_rate:
                return "status"
            return self.mode

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self._peers.add(tuple(peer[:2]))
        fault = self._draw()
        if fault is None:
            self.answered += 1
            return await super()._chat(request)
        self.faults[fault if fault != "status" else str(self.fail_status)] += 1
        body = await request.read()
        self.record(request, body)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        payload.setdefault("model", "gpt-4o")
        if fault == "status":
            return web.json_response(SERVER_ERROR, status=self.fail_status)
        if fault == "reset":
            return self._reset(request)
        if fault == "hang":
            await self._hang(request)
            return self._reset(request)
        if fault == "429":
            return web.json_response(RATE_ERROR, status=429, headers={"Retry-After": str(self.retry_after)})
        if fault == "529":
            return web.json_response(OVERLOADED, status=529, reason="Overloaded")
        if fault == "context_length":
            return web.json_response(CONTEXT_ERROR, status=400)
        return await self._faulty_stream(request, payload, fault)

    async def _faulty_stream(self, request: web.Request, payload: dict[str, Any], fault: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if fault == "context_length_stream":
            await resp.write(b"data: " + orjson.dumps(CONTEXT_ERROR) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        events = [b"data: " + orjson.dumps(c.model_dump(mode="json", exclude_unset=True)) + b"\n\n"
                  for c in self.chunks({**payload, "stream": True})]
        for event in events[:self.chunks_before_fault]:
            self.chunks_sent += 1
            await resp.write(event)
        if self.fault_delay:  # the chunks reach the client (and past it) before the fault, not in one read
            await asyncio.sleep(self.fault_delay)
        if fault == "error_stream":
            await resp.write(b"data: " + orjson.dumps(SERVER_ERROR) + b"\n\n")
            await resp.write_eof()
            return resp
        if fault == "hang_mid_stream":
            await self._hang(request)
        self._reset(request)  # drop_mid_stream, or the end of a hang: the stream never finishes
        return resp

    async def _hang(self, request: web.Request) -> None:
        """Wait `hang_seconds`, or until `release()`, or until the client closes the connection (aiohttp does
        not cancel the handler then: the connection is looked at every 20 ms)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hang_seconds
        while not self._wake.is_set() and (left := deadline - loop.time()) > 0:
            transport = request.transport
            if transport is None or transport.is_closing():
                self.abandoned += 1
                self.client_gone.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, 0.02))

    @staticmethod
    def _reset(request: web.Request) -> web.Response:
        """Close the connection with a TCP RST (SO_LINGER 0), with nothing more sent."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=499)  # never sent: the connection is gone
