"""`POST /v1/chat/completions`: read the body once (bounded), parse it once
with orjson, check the few fields routing needs, resolve the model group, and
answer from the cache or through the dispatcher (`router.routing.dispatch`).
Nothing here is validated into models or re-serialized: providers get the
parsed dict and the original bytes.

This is the hot path, so it is a plain ASGI handler (`router.app` dispatches
to it before Starlette's middleware and routing); every other endpoint is a
Starlette route."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from router import hops
from router.auth import Client, check_model
from router.errors import RouterError
from router.providers.base import ChatCall
from router.routing.deployment import ModelGroup
from router.state import RouterState
from router.upstream import DISCONNECTS, Disconnects, SSEResponse

log = logging.getLogger("router.chat")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
NO_ATTEMPTS = (b"x-router-attempts", b"0")  # a cache hit: no upstream was asked


# A body over the limit is read and thrown away (at most this much more, within the body deadline) before the
# 413 is sent, as nginx does: a server that answers and closes with unread bytes makes the kernel reset the
# connection, and the client sees a reset instead of the 413.
DISCARD_LIMIT = 64 * 1024 * 1024
CLOSE = {"Connection": "close"}


def _too_large(limit: int) -> RouterError:
    return RouterError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large",
                       headers=CLOSE)


def _client_gone() -> RouterError:
    # the client closed the connection, or `server.RouterHttpProtocol` closed it for a late body (after
    # answering 408): nobody reads this answer; 499 is what access logs and metrics call it (nginx's code)
    return RouterError(499, "The client closed the connection before sending the whole body.",
                       code="client_closed_request")


async def _discard(receive: Receive, message: Message) -> None:
    """Read and drop the rest of a refused body, at most `DISCARD_LIMIT` bytes."""
    dropped = 0
    while message.get("more_body", False) and dropped < DISCARD_LIMIT:
        message = await receive()
        dropped += len(message.get("body", b""))


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body; 413 beyond `limit` bytes, after discarding the rest (and the connection closes).

    Its deadline (`REQUEST_BODY_TIMEOUT`) is kept by the server's protocol (`router.server`), which costs a
    request nothing; a client gone before the end is a 499 nobody reads."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                if not any(n == b"expect" for n, _ in scope["headers"]):  # one awaiting `100 Continue` sent none
                    await _discard(receive, {"more_body": True})
                raise _too_large(limit)
            break
    message = await receive()
    if message["type"] != "http.request":
        raise _client_gone()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            raise _client_gone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await _discard(receive, message)
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


# the stdlib decoder, objects kept as lists of pairs: the last object it builds is the outermost one
_PAIRS = json.JSONDecoder(object_pairs_hook=list)


def duplicate_key(body: bytes, payload: dict[str, Any]) -> str | None:
    """A top-level key that `body` repeats (orjson kept only its last value), else None.

    Exact: the body is scanned again by the stdlib's C decoder keeping pairs (2-6 us for a typical 1-2 KB
    request, ~40 us for 10 KB of tools and messages or 100 KB of text, measured). A text filter (counting
    each key's quoted spelling with `bytes.count`) was measured slower from 1 KB up, so there is none;
    `len(payload)` lets a body whose pairs all differ finish without building a set.
    """
    try:
        pairs = _PAIRS.decode(body.decode())
    except (ValueError, RecursionError):
        raise RouterError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if len(pairs) == len(payload):
        return None
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def parse_object(body: bytes) -> dict[str, Any]:
    """The body parsed once, as a JSON object (else 400); a repeated top-level key is refused (400)."""
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "The request body must be a JSON object.", code="invalid_request")
    duplicate = duplicate_key(body, payload)
    if duplicate is not None:
        raise RouterError(400, f"The request body repeats the key '{duplicate[:100]}'; each key may appear once.",
                          code="duplicate_key", param=duplicate[:100])
    return payload


def parse_chat(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = payload.get("model")
    if model is None and "models" in payload:  # OpenRouter: the list alone names the model, then the fallbacks
        listed = payload["models"]
        model = listed[0] if isinstance(listed, list) and listed else None
    if not isinstance(model, str) or not model.strip():
        msg = "you must provide a model parameter" if model is None else "'model' must be a non-empty string"
        raise RouterError(400, msg, param="model",
                          code="invalid_value" if model is not None else "missing_required_parameter")
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
        if not isinstance(role, str) or role not in ROLES:
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
        hops.enter(scope, state.settings.router_instance_id)  # 508 for a request that looped back here
        client = state.keys.authenticate(scope)
        call = parse_chat(await read_body(scope, receive, state.settings.max_body_bytes))
        group = state.routes.resolve(call.model)
        name = group.name or call.model  # the group's name; a prefix rule's shared group has none
        deployments = group.deployments
        model = metrics.model_label(call.model)
        provider_name = deployments[0].type if len(deployments) == 1 else "routed"
        allowed(client, call.model, name)
        then = alternatives(state, client, call) if "models" in call.payload else ()
        metrics.client(client.label)
        # the group's own limits count every name it goes by
        limit_headers = await state.limiter.check(
            client, call if name == call.model else dataclasses.replace(call, model=name))
        response = await answer_unless_gone(state, client, group, name, call, scope, then)
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


def allowed(client: Client, model: str, group: str) -> None:
    """403 unless the key's allow-list names the model as sent or, for an alias, the group it stands for."""
    if client.key is None or client.key.models is None or model in client.key.models:
        return
    check_model(client, group)


MAX_MODELS = 8  # models a request may list (OpenRouter's `models`: the model, then its fallbacks)


def alternatives(state: RouterState, client: Client, call: ChatCall) -> tuple[ModelGroup, ...]:
    """The groups OpenRouter's `models` list names after the request's model, in order: each must exist and
    be allowed to the client's key (404 / 403 otherwise, as for `model`)."""
    listed = call.payload["models"]
    if (not isinstance(listed, list) or not listed or len(listed) > MAX_MODELS
            or not all(isinstance(m, str) and m.strip() for m in listed)):
        raise RouterError(400, f"'models' must be an array of 1 to {MAX_MODELS} model names.", param="models",
                          code="invalid_value")
    out: list[ModelGroup] = []
    for name in listed:
        if name == call.model:
            continue
        group = state.routes.resolve(name)
        allowed(client, name, group.name or name)
        out.append(group)
    return tuple(out)


async def answer_unless_gone(state: RouterState, client: Client, group: ModelGroup, name: str, call: ChatCall,
                             scope: Scope, then: tuple[ModelGroup, ...]) -> Response | SSEResponse:
    """`answer`, cancelled as soon as the client's connection is lost (the server's `Disconnects`): the upstream
    call is given up instead of running to its end for nobody (a stream's relay watches on its own later)."""
    disconnects: Disconnects | None = (scope.get("extensions") or {}).get(DISCONNECTS, {}).get("connection")
    if disconnects is None:
        return await answer(state, client, group, name, call, scope, then)
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def client_left() -> None:
        nonlocal gone
        if not gone:
            gone = True
            task.cancel()

    disconnects.callbacks.append(client_left)
    try:
        if disconnects.lost:
            client_left()
        return await answer(state, client, group, name, call, scope, then)
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()  # our own cancellation, for a client that left: not an error
        raise _client_left() from None
    finally:
        disconnects.callbacks.remove(client_left)


def _client_left() -> RouterError:
    return RouterError(499, "The client closed the connection before the answer was ready.",
                       code="client_closed_request")


async def answer(state: RouterState, client: Client, group: ModelGroup, name: str, call: ChatCall,
                 scope: Scope, then: tuple[ModelGroup, ...] = ()) -> Response | SSEResponse:
    """From the cache when it may and can (no deployment is involved then), else from one of the group's
    deployments, or of the groups after it (and stored when it may)."""
    read, write = state.cache.policy(call, scope)
    if not (read or write):
        return await state.dispatcher.send(group, call, client, then)
    key = state.cache.key(client, name, call)
    if read:
        cached = await state.cache.lookup(key, call)
        if cached is not None:
            cached.raw_headers.append(NO_ATTEMPTS)
            return cached
    response = await state.dispatcher.send(group, call, client, then)
    if write:
        state.cache.record(key, response)
    return response
