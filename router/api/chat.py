"""`POST /v1/chat/completions`: read the body once (bounded), parse it once
with orjson, check the few fields routing needs, resolve the provider, answer.
Nothing here is validated into models or re-serialized: providers get the
parsed dict and the original bytes."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.errors import RouterError
from router.providers.base import ChatCall
from router.state import RouterState
from router.upstream import SSEResponse

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RouterError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RouterError(413, f"Request body is larger than the limit of {limit} bytes.",
                              code="request_too_large")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_chat(body: bytes) -> ChatCall:
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "The request body must be a JSON object.", code="invalid_request")
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


async def chat_completions(request: Request) -> Response:
    state: RouterState = request.app.state.router
    metrics = state.metrics
    started = time.perf_counter()
    model, provider_name = "unknown", "none"
    metrics.in_flight.inc()
    try:
        call = parse_chat(await read_body(request, state.settings.max_body_bytes))
        provider = state.routes.resolve(call.model)
        model, provider_name = metrics.model_label(call.model), provider.type
        response = await provider.chat(call)
    except RouterError as exc:
        metrics.in_flight.dec()
        metrics.observe(model, provider_name, exc.status, started)
        return exc.response()
    except BaseException:
        metrics.in_flight.dec()
        metrics.observe(model, provider_name, 500, started)
        raise
    if isinstance(response, SSEResponse):
        def finished() -> None:
            metrics.in_flight.dec()
            metrics.observe(model, provider_name, response.status_code, started)

        response.on_close.append(finished)
    else:
        metrics.in_flight.dec()
        metrics.observe(model, provider_name, response.status_code, started)
    return response
