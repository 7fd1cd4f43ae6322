"""The HTTP protocol `router serve` runs: uvicorn's httptools protocol with deadlines for a request's
head and body.

uvicorn bounds idle keep-alive connections but not a request whose head or body trickles in (or never
comes), so each such connection would be held open for ever. `RouterHttpProtocol` gives every request
head `REQUEST_HEADER_TIMEOUT` seconds, counted from the connection's opening for the first request and
from the first byte of each later one (nginx's `client_header_timeout`), and every request body
`REQUEST_BODY_TIMEOUT` seconds from the end of its head (nginx's `client_body_timeout` bounds the gap
between reads; this bounds the whole body). A request late in either phase gets `408` (nothing when
no byte came at all) and its connection is closed; the handler waiting for the body then sees the
client gone. One timer per connection does this, so a request costs a few attribute writes and a
clock read, not a timer of its own. The protocol also tells a streaming response the moment its client's
connection is lost (`router.upstream.Disconnects`, in the scope's extensions), so a stream needs no task
of its own to watch for that. While the worker drains (`router.shutdown`) every answer closes its
connection, and when the grace period is over `cut_all` ends what is still open: a 503, or a stream's final
error event, then close.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from router.config import Settings
from router.errors import RouterError, error_body
from router.upstream import DISCONNECTS, Disconnects


def _timeout_response(what: str) -> tuple[bytes, bytes]:
    body = error_body(f"The request's {what} did not arrive in time.", 408, code="request_timeout")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n" % len(body)), body


_HEAD_LATE = _timeout_response("headers")
_BODY_LATE = _timeout_response("body")

_GONE = RouterError(503, "The router is shutting down and could not finish this request in its grace period; "
                    "retry it.", code="shutting_down")
_GONE_BODY = _GONE.body()
_GONE_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\nconnection: close\r\n" % len(_GONE_BODY))
_GONE_EVENT = b"\n" + _GONE.sse_event()  # the newline ends an event left open (an extra blank line is harmless)
_GONE_CHUNKS = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_GONE_EVENT), _GONE_EVENT)  # the event, then the body's end


class RouterHttpProtocol(HttpToolsProtocol):
    """One client connection; closes it when a request's head or body is late."""

    # set from the settings by `configure`, in each worker, before it serves
    header_timeout = 10.0
    body_timeout = 30.0
    # this worker's server (its connections and request tasks), for `begin_drain` and `cut_all`
    served: ServerState | None = None
    draining = False  # set by `begin_drain`: every answer closes its connection

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.header_timeout = settings.request_header_timeout
        cls.body_timeout = settings.request_body_timeout

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._since: float | None = None  # when the pending phase (head or body) began; None: none pending
        self._limit = self.header_timeout  # the pending phase's allowance
        self._in_body = False  # the pending phase is a body (else a head)
        self._head_bytes = False  # a byte of the pending head has arrived
        self._timer: asyncio.TimerHandle | None = None
        self._disconnects = Disconnects()
        self._extension: dict[object, object] = {"connection": self._disconnects}  # ASGI: an extension is a dict

    # The timer fires at the pending phase's deadline, or a head allowance later when nothing is pending.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        RouterHttpProtocol.served = self.server_state
        self._since = self.loop.time()
        self._timer = self.loop.call_later(self.header_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
        self._disconnects.lose()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECTS: self._extension}
        self._head_bytes = True
        if self._since is None:  # a later request on a kept-alive connection: its own deadline
            self._since = self.loop.time()
            self._limit, self._in_body = self.header_timeout, False

    def on_headers_complete(self) -> None:
        self._head_bytes = False
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with `connection: close`: the client reconnects elsewhere
        if self.pipeline:  # queued behind a request still being answered: its body is read later
            self._since = None
        else:
            self._since = self.loop.time()
            self._limit, self._in_body = self.body_timeout, True
            deadline = self._since + self.body_timeout
            if self._timer is not None and self._timer.when() > deadline:  # a body allowance below the head's
                self._timer.cancel()
                self._timer = self.loop.call_at(deadline, self._check)

    def on_message_complete(self) -> None:
        self._since = None
        super().on_message_complete()

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        left = self.header_timeout if self._since is None else self._since + self._limit - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # an answer is on its way (a pipelined head trickles in behind it, say): finish it, then close
            cycle.keep_alive = False
            return
        late = _BODY_LATE if self._in_body else _HEAD_LATE if self._head_bytes else None
        if late is not None:
            headers = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
            self.transport.write(late[0] + headers + b"\r\n" + late[1])
        self.transport.close()  # uvicorn then tells a handler waiting for the body that the client left

    @classmethod
    def begin_drain(cls) -> None:
        """The worker is shutting down: every answer from now on, those under way included, closes its
        connection (uvicorn closes idle ones when it closes the listener)."""
        cls.draining = True
        for conn in cls.served.connections if cls.served is not None else ():
            if isinstance(conn, RouterHttpProtocol) and conn.cycle is not None and not conn.cycle.response_complete:
                conn.cycle.keep_alive = False

    @classmethod
    def cut_all(cls) -> int:
        """The grace period is over: end every request still running, as well as can still be said, and
        cancel its handler. The number of requests cut."""
        served = cls.served
        if served is None:
            return 0
        cut = sum(conn.cut() for conn in list(served.connections) if isinstance(conn, RouterHttpProtocol))
        for task in served.tasks:  # handlers still waiting (an upstream's answer): a stream's cancels itself
            if not task.done() and not task.cancelling():
                task.cancel()
        return cut

    def cut(self) -> bool:
        """End this connection: a request not yet answered gets a 503 `shutting_down`, a stream a final error
        event and its end; then the connection closes. Whether a request was under way."""
        if self.transport.is_closing():
            return False
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if cycle is not None and busy and not self.pipeline:
            if not cycle.response_started:
                headers = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
                self.transport.write(_GONE_HEAD + headers + b"\r\n" + _GONE_BODY)
            elif cycle.chunked_encoding:
                self.transport.write(_GONE_CHUNKS)
        if cycle is not None:
            cycle.disconnected = True  # whatever the handler still sends goes nowhere
        self.transport.close()
        self._disconnects.lose()  # a stream stops now (router.upstream.SSEResponse), its upstream closed
        return busy
