"""Upstream HTTP: the pooled keep-alive client every `ApiProvider` shares (stale
pooled connections retried once, answers bounded and checked for shape, keys
scrubbed from what is relayed), the mapping of transport failures to OpenAI
errors (502/504), and the SSE relay that passes a stream through chunk by chunk.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
import orjson
from yarl import URL
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router import hops
from router.config import Settings
from router.errors import RouterError, Scrubber, upstream_error

# Upstream response headers worth handing to the client, each with what a valid value looks like.
_HTTP_DATE = re.compile(r"[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")
_PASS_HEADERS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("retry-after", lambda v: v.isdigit() or _HTTP_DATE.fullmatch(v) is not None),
    ("openai-processing-ms", lambda v: v.replace(".", "", 1).isdigit()),
    ("x-request-id", lambda v: len(v) <= 200 and v.isascii() and v.isprintable()),
)
_WHAT = {"choices": "a completion", "data": "a list of embeddings", "output": "a response"}
#: upstream headers a client sees under another name: the router's own `x-request-id` is the request's
_RENAMED = {"x-request-id": "x-upstream-request-id"}
_DONE_TAIL = 32  # bytes of stream tail kept to see whether `data: [DONE]` arrived
USER_AGENT = "llm-router"  # what upstreams see (no library or Python version)
#: seconds within which a pooled connection closed under a request counts as closed before it was read (the
#: upstream's idle close crossing our request: sent again at once); later, the upstream held it and then failed
STALE_CLOSE_WITHIN = 0.25


#: the request id the current request sends upstream; unset outside a routed request. It goes as
#: `x-client-request-id`, OpenAI's header for a caller's own id: some servers refuse an `x-request-id` that is
#: not a UUID (llama-cpp-python answers 400), and the upstream's `x-request-id` is its own
outgoing_request_id: ContextVar[str | None] = ContextVar("router_request_id", default=None)
REQUEST_ID_HEADER = "x-client-request-id"
#: the W3C `traceparent` of the current upstream attempt's span (`router.observability.tracing`), when tracing
outgoing_traceparent: ContextVar[str | None] = ContextVar("router_traceparent", default=None)

#: ASGI scope extension whose "connection" is the client connection's `Disconnects` (`router.server` offers it)
DISCONNECTS = "router.disconnects"


class Disconnects:
    """One client connection's loss, told to whoever waits on it: the server calls `lose` once the connection
    is gone; a response registers a callback. (An ASGI app otherwise learns of it only from `receive`, which
    takes a task per stream to watch.)"""

    __slots__ = ("lost", "callbacks")

    def __init__(self) -> None:
        self.lost = False
        self.callbacks: list[Callable[[], None]] = []

    def lose(self) -> None:
        self.lost = True
        for callback in tuple(self.callbacks):
            callback()


class JSONAnswer(Response):
    """A JSON answer relayed as it came: Starlette's `Response` (so everything that handles one handles it)
    with its head built in one step from the relayed headers (Starlette's own `__init__` renders and
    inspects each header: a few microseconds per request on the hot path)."""

    media_type = "application/json"
    #: the answer's token usage (OpenAI's `usage` object), when whoever made the answer knows it
    usage: dict[str, Any] | None = None

    def __init__(self, body: bytes, status_code: int, headers: Mapping[str, str]) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        if headers:
            self.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class SSEResponse:
    """A text/event-stream ASGI response relayed chunk by chunk.

    If the client leaves while it streams, the relay is cancelled at once (which closes the upstream) instead
    of noticing only at the next chunk: through the server's `Disconnects` when it offers them (a callback,
    nothing per stream), else through a watcher task that waits on `receive`. The source is always closed
    and the `on_close` callbacks always run: stream ended, failed, or client gone.
    """

    #: the stream's token usage (OpenAI's `usage` object), once whoever made the stream knows it
    usage: dict[str, Any] | None = None
    #: what read the stream for its usage (`router.routing.usage.UsageTap`: its event count, the answer it kept),
    #: found here whatever wraps the stream later (renames, the cache's recording)
    tap: Any = None

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = content
        self.status_code = status_code
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        if headers:
            self.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.on_close: list[Callable[[], None]] = []
        #: the failure a final error event of this stream reports (set as the event is made), so that a caller
        #: that has sent nothing yet can try elsewhere instead
        self.failure: RouterError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        finished = disconnected = False

        def client_left() -> None:
            nonlocal disconnected
            if not finished and not disconnected:
                disconnected = True
                task.cancel()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left()

        disconnects: Disconnects | None = (scope.get("extensions") or {}).get(DISCONNECTS, {}).get("connection")
        watcher = None
        if disconnects is None:
            watcher = asyncio.create_task(watch())
        else:
            disconnects.callbacks.append(client_left)
            if disconnects.lost:
                client_left()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True  # no await between the last send and here: a late cancel cannot land
        except asyncio.CancelledError:
            if not disconnected:
                raise
            task.uncancel()  # our own cancellation, for a client that left: not an error
        finally:
            finished = True
            if watcher is not None:
                watcher.cancel()
            elif disconnects is not None:
                disconnects.callbacks.remove(client_left)
            await close_source(self.body_iterator)
            for callback in self.on_close:
                callback()


async def close_source(source: AsyncIterator[bytes]) -> None:
    """Close a stream's source (an async generator, or a wrapper around one) so its upstream is released."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def _nothing() -> AsyncIterator[bytes]:
    """An empty stream (a placeholder until the real source is set)."""
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


def sse_error_tail(tail: bytes) -> bytes:
    """Separator needed before an injected event so it never lands inside another."""
    if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):
        return b""
    return b"\n\n" if not tail.endswith(b"\n") else b"\n"


#: failures that happened before the upstream answered anything: a request may go to another replica
NOT_ANSWERED = frozenset({"upstream_unreachable", "upstream_disconnected"})

#: errnos of a connection the upstream closed (or reset) under a request, as ClientOSError carries them
_CLOSED_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

#: the current attempt's timeouts (`client_timeouts`), set by the dispatcher around one deployment's call and
#: read in `open`: one mechanism for every provider, with no provider's signature changed; None: the defaults
attempt_timeout: ContextVar[aiohttp.ClientTimeout | None] = ContextVar("upstream_attempt_timeout", default=None)


def client_timeouts(total: float, connect: float, idle: float) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """A deployment's timeouts for a whole exchange and for a stream, whose socket may also stay silent at
    most `idle` seconds (between chunks, and before the head)."""
    return (aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect),
            aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect, sock_read=idle))


#: whether the current request's connection came from the pool; set by `_PoolConnector`, read in `open`
_reused: ContextVar[bool] = ContextVar("upstream_connection_reused", default=False)


class _PoolConnector(aiohttp.TCPConnector):
    """The pool's connector, noting whether each request's connection served a request before.

    (aiohttp's `on_connection_reuseconn` trace says the same, but any trace config makes aiohttp send
    a dozen signals per request: about a tenth of the router's CPU per request, measured.)"""

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Trace],
                      timeout: aiohttp.ClientTimeout) -> Connection:
        conn = await super().connect(req, traces, timeout)
        proto = conn.protocol
        if proto is not None:
            _reused.set(getattr(proto, "router_served", False))
            setattr(proto, "router_served", True)  # noqa: B010 - aiohttp's protocol declares no such field
        return conn


def _closed_before_answer(exc: BaseException) -> bool:
    """The upstream closed the connection under the request before sending any of the answer."""
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError)):
        return True
    return (isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
            and exc.errno in _CLOSED_ERRNOS)


class UpstreamClient:
    """One aiohttp session with a keep-alive pool, shared by all API providers (and by the Local Agent).

    Idle connections are kept `keepalive_timeout` seconds, below the upstreams' own idle timeouts. A request
    whose *pooled* connection the upstream closed before answering (it closed it as idle just as the request
    went out: the request was never processed) is sent again at once, once, on a new connection; a new
    connection that fails is a real failure. Answers are bounded: `max_response_bytes` for a whole one,
    `max_stream_line_bytes` for one line of a stream."""

    def __init__(self, scrub: Scrubber, *, timeout: float, connect_timeout: float, max_connections: int,
                 keepalive_timeout: float = 4.0, max_response_bytes: int = 32 << 20,
                 max_stream_line_bytes: int = 4 << 20) -> None:
        self.scrub = scrub
        self.keepalive_timeout = keepalive_timeout
        self.max_response_bytes = max_response_bytes
        self.max_stream_line_bytes = max_stream_line_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout, sock_connect=connect_timeout)
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # new connections only: for the one retry

    @classmethod
    def from_settings(cls, settings: Settings, scrub: Scrubber) -> UpstreamClient:
        return cls(scrub, timeout=settings.upstream_timeout, connect_timeout=settings.upstream_connect_timeout,
                   max_connections=settings.upstream_max_connections,
                   keepalive_timeout=settings.upstream_keepalive_timeout,
                   max_response_bytes=settings.max_response_bytes,
                   max_stream_line_bytes=settings.max_stream_line_bytes)

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False,
            # a proxy must never keep one upstream answer's cookies and replay them for another client
            cookie_jar=aiohttp.DummyCookieJar(),
            # our own name rather than aiohttp's and Python's versions (a default header costs less per
            # request than aiohttp's `skip_auto_headers`, measured)
            headers={"User-Agent": USER_AGENT}, raise_for_status=False,
        )

    async def start(self) -> None:
        self._session = self._new_session(
            _PoolConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300,
                           keepalive_timeout=self.keepalive_timeout))
        self._fresh = self._new_session(aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=True))

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    # -- requests --------------------------------------------------------------

    async def open(self, provider: str, url: str | URL, body: bytes,
                   headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """Send the request and wait for the response head; map transport failures.

        Redirects are not followed (the answer is the upstream's own), and the hop header of the request
        being served (`router.hops`) goes with it."""
        assert self._session is not None and self._fresh is not None, "UpstreamClient.start() was not awaited"
        chain, request_id, traceparent = hops.outgoing.get(), outgoing_request_id.get(), outgoing_traceparent.get()
        if chain is not None or request_id is not None or traceparent is not None:
            headers = dict(headers)
            if chain is not None:
                headers[hops.HOP_HEADER] = chain
            if request_id is not None:
                headers[REQUEST_ID_HEADER] = request_id
            if traceparent is not None:
                headers["traceparent"] = traceparent
        _reused.set(False)
        timeout = attempt_timeout.get() or self._timeout
        sent = time.monotonic()
        try:
            return await self._session.post(url, data=body, headers=headers, allow_redirects=False, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - mapped or re-raised below
            # the keep-alive race: a pooled connection closed as the request went out fails at once; one that
            # held the request a while first may have processed it, and is an attempt like any other
            if not (_reused.get() and _closed_before_answer(exc) and time.monotonic() - sent < STALE_CLOSE_WITHIN):
                raise self._open_error(exc, provider, url) from None
        try:  # the upstream closed its idle connection as this request went out: it was never processed
            return await self._fresh.post(url, data=body, headers=headers, allow_redirects=False, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001
            raise self._open_error(exc, provider, url) from None

    def _open_error(self, exc: BaseException, provider: str, url: str | URL) -> BaseException:
        if _closed_before_answer(exc):
            # a process that died, say: callers with another replica may retry there
            return RouterError(502, f"upstream {provider} at {urlsplit(str(url)).netloc} closed the connection "
                               "before answering", code="upstream_disconnected")
        return self.transport_error(exc, provider, url)

    async def read(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, up to `max_response_bytes` (else 502, and the connection is closed)."""
        limit = self.max_response_bytes
        try:
            length = resp.content_length
            if length is not None and length > limit:
                raise self._too_large(provider, "answer", limit)
            parts = []
            size = 0
            while chunk := await resp.content.readany():
                size += len(chunk)
                if size > limit:
                    raise self._too_large(provider, "answer", limit)
                parts.append(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except RouterError:
            resp.close()
            raise
        except BaseException as exc:  # noqa: BLE001
            resp.close()
            raise self.transport_error(exc, provider, url) from None
        finally:
            resp.release()

    @staticmethod
    def _too_large(provider: str, what: str, limit: int) -> RouterError:
        return RouterError(502, f"upstream {provider} sent an {what} larger than the router's limit of "
                           f"{limit} bytes", code="upstream_response_too_large")

    def transport_error(self, exc: BaseException, provider: str, url: str | URL) -> BaseException:
        host = urlsplit(str(url)).netloc
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return RouterError(504, f"upstream {provider} at {host} timed out", code="upstream_timeout")
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = self.scrub(str(exc.os_error) if exc.os_error else exc.__class__.__name__)
            return RouterError(502, f"could not connect to upstream {provider} at {host}: {reason}",
                               code="upstream_unreachable")
        if isinstance(exc, aiohttp.ClientError):
            return RouterError(502, f"upstream {provider} at {host} failed: {exc.__class__.__name__}",
                               code="upstream_error")
        return exc  # cancellation and programming errors propagate unchanged

    def error_from(self, provider: str, resp: aiohttp.ClientResponse, body: bytes) -> RouterError:
        return upstream_error(resp.status, body, self.scrub, provider, pass_headers(resp))

    # -- OpenAI-compatible pass-through ------------------------------------------

    async def forward(self, provider: str, url: str | URL, body: bytes, headers: Mapping[str, str],
                      stream: bool, field: str = "choices") -> Response | SSEResponse:
        """POST `body` as is and relay the answer: JSON whole (once seen to hold its `field` list: a completion's
        `choices`, embeddings' `data`), SSE chunk by chunk."""
        resp = await self.open(provider, url, body, headers)
        if resp.status >= 400:
            raise self.error_from(provider, resp, await self.read(provider, url, resp))
        if stream:
            return self.relay(provider, url, resp, self.lines(provider, resp))
        return await self.forward_read(provider, url, resp, field)

    async def forward_read(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse,
                           field: str = "choices") -> JSONAnswer:
        """A JSON answer read whole and relayed once seen to hold its `field` list; its usage read."""
        data = await self.read(provider, url, resp)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if not (isinstance(answer, dict) and isinstance(answer.get(field), list)):
            raise RouterError(502, f"upstream {provider} answered HTTP {resp.status} with "
                              f"{_kind(resp)} that is not {_WHAT.get(field, 'an answer')}",
                              code="upstream_bad_response")
        out = JSONAnswer(data, resp.status, pass_headers(resp, self.scrub))
        usage = answer.get("usage")
        out.usage = usage if isinstance(usage, dict) else None  # read once here: metrics and budgets need it
        return out

    def relay(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse,
              source: AsyncIterator[bytes]) -> SSEResponse:
        """Stream `source` (chunks made from `resp`) to the client; the one relay every provider uses.

        An answer that is not an event stream is a 502. A failure midway (the source raising RouterError,
        the connection breaking, an upstream event that cannot be read) ends the stream with a final
        `data: {"error": ...}` event, scrubbed of keys. The upstream connection goes back to the
        pool only after a complete stream; otherwise it is closed."""
        if resp.content_type != "text/event-stream":
            resp.close()
            raise RouterError(502, f"upstream {provider} answered a stream request with {_kind(resp)}, "
                              "not an event stream", code="upstream_bad_response")
        response = SSEResponse(_nothing(), resp.status, pass_headers(resp, self.scrub))
        response.body_iterator = self._relayed(provider, url, resp, source, response)
        return response

    async def _relayed(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse,
                       source: AsyncIterator[bytes], response: SSEResponse) -> AsyncIterator[bytes]:
        tail = b""
        complete = False
        failure: RouterError | None = None
        try:
            try:
                async for chunk in source:
                    tail = _tail(tail, chunk)
                    yield chunk
                complete = True
            except RouterError as exc:
                failure = exc.scrubbed(self.scrub)
            except (TimeoutError, aiohttp.ClientError) as exc:
                mapped = self.transport_error(exc, provider, url)
                assert isinstance(mapped, RouterError)
                failure = mapped
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # orjson's errors are ValueErrors
                failure = RouterError(502, f"upstream {provider} sent an event the router could not read: "
                                      f"{exc.__class__.__name__}", code="upstream_bad_response")
            if failure is not None:
                response.failure = failure  # what the event says, for a dispatcher that has sent nothing yet
                yield sse_error_tail(tail) + failure.sse_event()
        finally:
            if complete:
                resp.release()
            else:
                resp.close()

    async def lines(self, provider: str, resp: aiohttp.ClientResponse,
                    last: bytes = b"[DONE]") -> AsyncIterator[bytes]:
        """An upstream's stream as it comes, in whole lines; it must end with `last` (OpenAI's `[DONE]`;
        Anthropic's `message_stop`).

        A line still unfinished is held back (at most `max_stream_line_bytes` of it, else the stream ends
        with an error); a chunk of whole lines, the usual case, passes as it is. Lines that carry an
        `"error"` go through the scrubber: an upstream's error event may echo the key it got."""
        limit = self.max_stream_line_bytes
        held: list[bytes] = []  # pieces of the unfinished line
        held_size = 0
        tail = b""
        errored = False  # the last chunk relayed carried an error event
        async for chunk in resp.content.iter_any():
            end = chunk.rfind(b"\n") + 1
            if end == 0:  # no line ends in this chunk
                held.append(chunk)
                held_size += len(chunk)
                if held_size > limit:
                    raise self._too_large(provider, "event line", limit)
                continue
            if held:
                end += held_size
                held.append(chunk)
                chunk = b"".join(held)
                held.clear()
            held_size = len(chunk) - end
            if held_size:
                if held_size > limit:
                    raise self._too_large(provider, "event line", limit)
                held.append(chunk[end:])
                chunk = chunk[:end]
            errored = b'"error"' in chunk
            if errored:
                chunk = self.scrub(chunk.decode("utf-8", "replace")).encode()
            tail = _tail(tail, chunk)
            yield chunk
        if held:  # a last line with no newline after it
            chunk = b"".join(held)
            errored = b'"error"' in chunk
            if errored:
                chunk = self.scrub(chunk.decode("utf-8", "replace")).encode()
            tail = _tail(tail, chunk)
            yield chunk
        # an upstream that ended its stream with its own error event said why: no second error after it
        if last not in tail and not errored:
            raise RouterError(502, f"upstream {provider} closed the stream before {last.decode()}",
                              code="upstream_stream_truncated")


def _tail(tail: bytes, chunk: bytes) -> bytes:
    """The last `_DONE_TAIL` bytes of the stream so far."""
    return chunk[-_DONE_TAIL:] if len(chunk) >= _DONE_TAIL else (tail + chunk)[-_DONE_TAIL:]


def _kind(resp: aiohttp.ClientResponse) -> str:
    return f"'{resp.content_type}'" if resp.content_type else "a body of no declared type"


def pass_headers(resp: aiohttp.ClientResponse, scrub: Scrubber | None = None) -> dict[str, str]:
    """The upstream headers a client may see: well-formed values only, scrubbed when `scrub` is given.

    The upstream's `x-ratelimit-*` are not among them: they describe the operator's account; clients get
    the router's own."""
    out = {}
    for name, valid in _PASS_HEADERS:
        value = resp.headers.get(name)
        if value is not None and valid(value):
            out[_RENAMED.get(name, name)] = scrub(value) if scrub is not None else value
    return out
