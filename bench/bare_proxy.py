"""The bare proxy `make bench` compares the router with: raw ASGI on uvicorn (uvloop, httptools), one pooled
aiohttp session, the body read and parsed once with orjson, its bytes forwarded, JSON relayed whole and SSE
chunk by chunk. No auth, limits, metrics, checks or error mapping: the floor a Python router stands on.

    python -m bench.bare_proxy PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import orjson
import uvicorn
from yarl import URL

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.url = URL(upstream.rstrip("/") + "/v1/chat/completions", encoded=True)
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=4.0), auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.session is not None
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        payload = orjson.loads(body)
        stream = payload.get("stream") is True
        async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if not stream:
                data = await resp.read()
                await send({"type": "http.response.start", "status": resp.status, "headers": JSON_HEADERS})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": SSE_HEADERS})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(BareProxy(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="on")
