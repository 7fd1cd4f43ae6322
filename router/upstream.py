"""Upstream HTTP: the pooled keep-alive client every `ApiProvider` shares, the
mapping of transport failures to OpenAI errors (502/504), and the SSE relay
that passes a stream through chunk by chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
from yarl import URL
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router.config import Settings
from router.errors import RouterError, Scrubber, upstream_error

# Upstream response headers worth handing to the client unchanged.
_PASS_HEADERS = ("retry-after", "x-request-id", "openai-processing-ms")
_PASS_PREFIX = "x-ratelimit-"
_DONE_TAIL = 32  # bytes of stream tail kept to see whether `data: [DONE]` arrived


class SSEResponse:
    """A text/event-stream ASGI response relayed chunk by chunk.

    While it streams, one watcher task listens for the client leaving; if it
    does, the relay is cancelled at once (which closes the upstream), instead
    of noticing only at the next chunk. The source is always closed and the
    `on_close` callbacks always run: stream ended, failed, or client gone.
    """

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = content
        self.status_code = status_code
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        if headers:
            self.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.on_close: list[Callable[[], None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"finished": False, "disconnected": False}

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["finished"]:
                        state["disconnected"] = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            state["finished"] = True  # no await between the last send and here: a late cancel cannot land
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            task.uncancel()  # our own cancellation, for a client that left: not an error
        finally:
            state["finished"] = True
            watcher.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            for callback in self.on_close:
                callback()


def sse_error_tail(tail: bytes) -> bytes:
    """Separator needed before an injected event so it never lands inside another."""
    if not tail or tail.endswith(b"\n\n") or tail.endswith(b"\r\n\r\n"):
        return b""
    return b"\n\n" if not tail.endswith(b"\n") else b"\n"


#: failures that happened before the upstream answered anything: a request may go to another replica
NOT_ANSWERED = frozenset({"upstream_unreachable", "upstream_disconnected"})


class UpstreamClient:
    """One aiohttp session with a keep-alive pool, shared by all API providers (and by the Local Agent)."""

    def __init__(self, scrub: Scrubber, *, timeout: float, connect_timeout: float, max_connections: int) -> None:
        self.scrub = scrub
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout, sock_connect=connect_timeout)
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings, scrub: Scrubber) -> UpstreamClient:
        return cls(scrub, timeout=settings.upstream_timeout, connect_timeout=settings.upstream_connect_timeout,
                   max_connections=settings.upstream_max_connections)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300,
                                         keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False,
            # a proxy must never keep one upstream answer's cookies and replay them for another client
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",), raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- requests --------------------------------------------------------------

    async def open(self, provider: str, url: str | URL, body: bytes,
                   headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """Send the request and wait for the response head; map transport failures."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        try:
            return await self._session.post(url, data=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:  # before the more general ClientOSError below
            raise self.transport_error(exc, provider, url) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # closed before any answer came (a kept-alive connection to a process that died, say):
            # callers with another replica may retry there
            raise RouterError(502, f"upstream {provider} at {urlsplit(str(url)).netloc} closed the connection "
                              "before answering", code="upstream_disconnected") from None
        except BaseException as exc:  # noqa: BLE001 - mapped or re-raised below
            raise self.transport_error(exc, provider, url) from None

    async def read(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except BaseException as exc:  # noqa: BLE001
            resp.close()
            raise self.transport_error(exc, provider, url) from None
        finally:
            resp.release()

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
                      stream: bool) -> Response:
        """POST `body` as is and relay the answer: JSON whole, SSE chunk by chunk."""
        resp = await self.open(provider, url, body, headers)
        if resp.status >= 400:
            raise self.error_from(provider, resp, await self.read(provider, url, resp))
        if stream and resp.content_type == "text/event-stream":
            return self.relay(provider, url, resp, _until_done(provider, resp))
        data = await self.read(provider, url, resp)
        return Response(data, resp.status, pass_headers(resp),
                        media_type=resp.content_type or "application/json")

    def relay(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse,
              source: AsyncIterator[bytes]) -> SSEResponse:
        """Stream `source` (chunks made from `resp`) to the client; the one relay every provider uses.

        A failure midway (the source raising RouterError, the connection breaking,
        an upstream event that cannot be read) ends the stream with a final
        `data: {"error": ...}` event. The upstream connection goes back to the
        pool only after a complete stream; otherwise it is closed."""
        return SSEResponse(self._relayed(provider, url, resp, source), resp.status, pass_headers(resp))

    async def _relayed(self, provider: str, url: str | URL, resp: aiohttp.ClientResponse,
                       source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        tail = b""
        complete = False
        try:
            async for chunk in source:
                tail = (tail + chunk)[-_DONE_TAIL:]
                yield chunk
            complete = True
        except RouterError as err:
            yield sse_error_tail(tail) + err.sse_event()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            err = self.transport_error(exc, provider, url)
            assert isinstance(err, RouterError)
            yield sse_error_tail(tail) + err.sse_event()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # orjson's errors are ValueErrors
            err = RouterError(502, f"upstream {provider} sent an event the router could not read: "
                              f"{exc.__class__.__name__}", code="upstream_bad_response")
            yield sse_error_tail(tail) + err.sse_event()
        finally:
            if complete:
                resp.release()
            else:
                resp.close()


async def _until_done(provider: str, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """An OpenAI-compatible upstream's bytes as they come; a stream must end with [DONE]."""
    tail = b""
    async for chunk in resp.content.iter_any():
        tail = (tail + chunk)[-_DONE_TAIL:]
        yield chunk
    if b"[DONE]" not in tail:
        raise RouterError(502, f"upstream {provider} closed the stream before [DONE]",
                          code="upstream_stream_truncated")


def pass_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    out = {}
    for name, value in resp.headers.items():
        low = name.lower()
        if low in _PASS_HEADERS or low.startswith(_PASS_PREFIX):
            out[low] = value
    return out
