"""`POST /v1/chat/completions`: read the body once (bounded), parse it once
with orjson, check the few fields routing needs, resolve the provider, answer.
Nothing here is validated into models or re-serialized: providers get the
parsed dict and the original bytes.

This is the hot path, so it is a plain ASGI handler (`router.app` dispatches
to it before Starlette's middleware and routing); every other endpoint is a
Starlette route."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router.auth import Client, check_model
from router.errors import RouterError
from router.providers.base import ChatCall, Provider
from router.state import RouterState
from router.upstream import SSEResponse

log = logging.getLogger("router.chat")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _too_large(limit: int) -> RouterError:
    return RouterError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise _too_large(limit)
            break
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body parsed once, as a JSON object (else 400)."""
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "The request body must be a JSON object.", code="invalid_request")
    return payload


def parse_chat(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        msg = "you must provide a model parameter" if model is None else "'model' must be a non-empty string"
        raise RouterError(400, msg, param="model", code="invalid_value" if model is not None else "missing_required_parameter")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        msg = "Missing required parameter: 'messages'." if messages is None else "'messages' must be a non-empty array"
        raise RouterError(400, msg, param="messages",
                          code="missing_required_parameter" if messages is None else "invalid_value")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RouterError(400, f"Invalid type for 'messages[{i}]': expected an object.",
                              param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise RouterError(400, f"Invalid value for 'messages[{i}].role': {role!r}. "
                              f"Supported values are: {', '.join(sorted(ROLES))}.",
                              param=f"messages[{i}].role", code="invalid_value")
    stream = payload.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise RouterError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RouterError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = bool(stream and options and options.get("include_usage") is True)
    return ChatCall(model, payload, body, stream, include_usage)


async def chat_completions(state: RouterState, scope: Scope, receive: Receive, send: Send) -> None:
    metrics = state.metrics
    started = time.perf_counter()
    model, provider_name = "unknown", "none"
    limit_headers: list[tuple[bytes, bytes]] = []
    metrics.in_flight.inc()
    try:
        client = state.keys.authenticate(scope)
        call = parse_chat(await read_body(scope, receive, state.settings.max_body_bytes))
        provider = state.routes.resolve(call.model)
        model, provider_name = metrics.model_label(call.model), provider.type
        check_model(client, call.model)
        metrics.client(client.label)
        limit_headers = await state.limiter.check(client, call)
        response = await answer(state, client, provider, call, scope)
    except RouterError as exc:
        response = exc.response()
    except Exception:
        log.exception("unhandled error serving model %s", model)
        response = RouterError(500, "The server had an error while processing your request.",
                               code="internal_error").response()
    if limit_headers:
        response.raw_headers += limit_headers

    if isinstance(response, SSEResponse):
        def finished() -> None:
            metrics.in_flight.dec()
            metrics.observe(model, provider_name, response.status_code, started)

        response.on_close.append(finished)
        await response(scope, receive, send)
        return
    try:
        await response(scope, receive, send)
    finally:
        metrics.in_flight.dec()
        metrics.observe(model, provider_name, response.status_code, started)


async def answer(state: RouterState, client: Client, provider: Provider, call: ChatCall,
                 scope: Scope) -> Response | SSEResponse:
    """From the cache when it may and can, else from the provider (and stored when it may)."""
    read, write = state.cache.policy(call, scope)
    if not (read or write):
        return await provider.chat(call)
    key = state.cache.key(client, provider, call)
    if read:
        cached = await state.cache.lookup(key, call)
        if cached is not None:
            return cached
    response = await provider.chat(call)
    if write:
        state.cache.record(key, response)
    return response
