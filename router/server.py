"""The HTTP protocol `router serve` runs: uvicorn's httptools protocol with a request-head timeout.

uvicorn bounds idle keep-alive connections but not a request whose head trickles in (or never
comes), so each such connection would be held open for ever. `RouterHttpProtocol` gives every
request head `REQUEST_HEADER_TIMEOUT` seconds, counted from the connection's opening for the first
request and from the first byte of each later one (nginx's `client_header_timeout`): a connection
still without a complete head then gets `408` (nothing when no byte came) and is closed. The
body's own deadline is the chat handler's (`REQUEST_BODY_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from router.config import Settings
from router.errors import error_body

_TIMEOUT_BODY = error_body("The request's headers did not arrive in time.", 408, code="request_timeout")
_TIMEOUT_HEAD = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: close\r\n" % len(_TIMEOUT_BODY))


class RouterHttpProtocol(HttpToolsProtocol):
    """One client connection; closes it when a request head is not complete within `header_timeout`."""

    header_timeout = 10.0  # set from the settings by `configure`, in each worker, before it serves

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.header_timeout = settings.request_header_timeout

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_since: float | None = None  # when the pending request head began; None: none pending
        self._head_bytes = False  # a byte of the pending head has arrived
        self._head_timer: asyncio.TimerHandle | None = None

    # One timer per connection, not per request: it fires at the pending head's deadline, or a timeout
    # later when no head is pending; a request costs two attribute writes and a clock read.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout, self._check_head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = True
        if self._head_since is None:  # a later request on a kept-alive connection: its own deadline
            self._head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._head_bytes = False
        super().on_headers_complete()

    def _check_head(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        left = self.header_timeout if self._head_since is None else \
            self._head_since + self.header_timeout - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._check_head)
        elif self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head trickles in while the previous request is answered: finish that, then close
            self.cycle.keep_alive = False
        else:
            if self._head_bytes:
                headers = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
                self.transport.write(_TIMEOUT_HEAD + headers + b"\r\n" + _TIMEOUT_BODY)
            self.transport.close()
