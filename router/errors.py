"""OpenAI-format errors: the one exception type the request path raises, and
the helpers that turn anything (ours or an upstream's) into
`{"error": {"message", "type", "param", "code"}}` with secrets scrubbed from
every field and header that came from upstream."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    return _TYPE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, code: str | None = None, param: str | None = None,
               type: str | None = None) -> bytes:
    return orjson.dumps({"error": {
        "message": message,
        "type": type or error_type_for(status),
        "param": param,
        "code": code,
    }})


class RouterError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type_for(status)
        self.headers = dict(headers) if headers else None

    def body(self) -> bytes:
        return error_body(self.message, self.status, self.code, self.param, self.type)

    def response(self) -> Response:
        return Response(self.body(), self.status, headers=self.headers, media_type="application/json")

    def scrubbed(self, scrub: Scrubber) -> RouterError:
        """This error with every text a client reads (message, type, param, code, headers) scrubbed."""
        return RouterError(
            self.status, scrub(self.message), code=scrub(self.code) if self.code is not None else None,
            param=scrub(self.param) if self.param is not None else None, type=scrub(self.type),
            headers={k: scrub(v) for k, v in self.headers.items()} if self.headers else None)

    def sse_event(self) -> bytes:
        """The final `data: {"error": ...}` event of a stream that failed midway."""
        return b"data: " + self.body() + b"\n\n"


async def router_error_response(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: a RouterError as its OpenAI error response."""
    assert isinstance(exc, RouterError)
    return exc.response()


async def http_error_response(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: its 404/405s as OpenAI errors."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return Response(error_body(f"Unknown request URL: {request.method} {request.url.path}.", 404,
                                   code="unknown_url"), 404, media_type="application/json")
    return Response(error_body(str(exc.detail), exc.status_code), exc.status_code, headers=exc.headers,
                    media_type="application/json")


# Anything that looks like a bearer/API key: OpenAI (sk-...), Anthropic (sk-ant-...),
# Google (AIza...), xAI (xai-...), Groq (gsk_...), OpenRouter (sk-or-...).
_KEYLIKE = re.compile(r"\b(?:sk-|sk_|xai-|gsk_|AIza)[A-Za-z0-9_\-\*\.]{6,}")


class Scrubber:
    """Removes configured secrets and key-shaped strings from text we pass on."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "[redacted]")
        return _KEYLIKE.sub("[redacted]", text)


def upstream_error(status: int, body: bytes, scrub: Scrubber, provider: str,
                   headers: Mapping[str, str] | None = None) -> RouterError:
    """Turn an upstream non-2xx answer into our error, keeping its message and status."""
    message, code, param, etype = None, None, None, None
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail")
            code = err.get("code")
            param = err.get("param")
            etype = err.get("type")
        elif isinstance(err, str):
            message = err
        if message is None and isinstance(data.get("detail"), str):
            message = data["detail"]
    if not isinstance(message, str):
        text = body.decode("utf-8", "replace").strip()
        message = text[:2000] if text else f"upstream {provider} answered HTTP {status}"
    return RouterError(
        status,
        message,
        code=str(code) if code is not None else None,
        param=param if isinstance(param, str) else None,
        type=etype if isinstance(etype, str) else None,
        headers=headers,
    ).scrubbed(scrub)
