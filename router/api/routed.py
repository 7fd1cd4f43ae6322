"""What every routed endpoint shares (chat, embeddings, legacy completions, Anthropic messages): one
`Endpoint` says how its body is parsed and how its errors look; `handle` does the rest the same way for all
of them: the request's record (`router.observability`), loop detection, the client's key, its budget, its
rate limits, the model group and the key's allow-list, the cache, the dispatcher (deployments, retries,
fallbacks), the request id upstream and back, usage and cost, and the record's end after the last byte.

This is the hot path, so it is a plain ASGI handler (`router.app` dispatches to it before Starlette's
middleware and routing); every other endpoint is a Starlette route."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router import hops, upstream
from router.api.body import read_body
from router.auth import Client, check_model
from router.errors import RouterError
from router.observability.exchange import Exchange
from router.observability.observer import REQUEST_ID, usage_in
from router.providers.base import ChatCall
from router.routing.deployment import ModelGroup
from router.routing.usage import UsageTap
from router.state import RouterState
from router.upstream import DISCONNECTS, Disconnects, SSEResponse

log = logging.getLogger("router.api")
NO_ATTEMPTS = (b"x-router-attempts", b"0")  # a cache hit: no upstream was asked
COST = b"x-router-cost"  # the answer's cost in USD (COST_HEADER)


def openai_error(exc: RouterError) -> Response:
    return exc.response()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A routed endpoint: its path (the request log's `endpoint`), how its body becomes a `ChatCall` (with its
    `op`: the provider method the dispatcher calls), and how an error is answered."""

    path: str
    parse: Callable[[bytes], ChatCall]
    error: Callable[[RouterError], Response] = openai_error
    #: whether OpenRouter's `models` list (fallback models named by the client) is read
    model_lists: bool = False
    #: what the endpoint adds to a parsed request before it is routed (the Responses API: its stored history)
    prepare: Callable[[RouterState, Exchange, ChatCall], Awaitable[ChatCall]] | None = None


async def handle(state: RouterState, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    observer = state.observer
    ex = observer.begin(scope["headers"], endpoint.path)
    in_flight = state.metrics.in_flight
    in_flight.value += 1
    response = await _serve(state, endpoint, ex, scope, receive)
    if isinstance(response, SSEResponse):
        def finished() -> None:
            in_flight.value -= 1
            settle_stream(state, ex, response)
            observer.finish(ex, time.perf_counter())

        response.on_close.append(finished)
        await response(scope, receive, send)
        return
    try:
        await response(scope, receive, send)
    finally:
        in_flight.value -= 1
        observer.finish(ex, time.perf_counter())


async def _serve(state: RouterState, endpoint: Endpoint, ex: Exchange, scope: Scope,
                 receive: Receive) -> Response | SSEResponse:
    """The answer, or the error as the endpoint answers errors; the request id on it; a non-stream answer's
    usage and cost (and `x-router-cost`)."""
    limit_headers: list[tuple[bytes, bytes]] = []
    outgoing = upstream.outgoing_request_id.set(ex.request_id)
    try:
        hops.enter(scope, state.settings.router_instance_id)  # 508 for a request that looped back here
        client = state.keys.authenticate(scope)
        ex.client = client.label
        if client.key is not None:
            ex.key = client.key
            ex.log_content = bool(client.key.log_content)
            if client.key.budget is not None:
                await state.budgets.check(client)
        response, limit_headers = await _route(state, endpoint, ex, client, scope, receive)
    except RouterError as exc:
        response = endpoint.error(exc)
        ex.error_code = exc.code
        if exc.code == "insufficient_quota":
            state.metrics.budget_rejections.inc()
    except Exception:
        log.exception("unhandled error serving model %s", ex.model)
        response = endpoint.error(RouterError(500, "The server had an error while processing your request.",
                                              code="internal_error"))
        ex.error_code = "internal_error"
    finally:
        upstream.outgoing_request_id.reset(outgoing)
    ex.status = response.status_code
    headers = response.raw_headers
    if limit_headers:
        headers += limit_headers
    headers.append((REQUEST_ID, ex.request_id.encode()))
    if not isinstance(response, SSEResponse):
        if ex.status < 400:
            usage = getattr(response, "usage", None)
            body = bytes(response.body)
            state.observer.settle(ex, usage if usage is not None else usage_in(body), ex.payload, ex.target,
                                  len(body) // 4)
            if ex.log_content:
                ex.response_body = body
        if state.settings.cost_header and ex.cost is not None:
            headers.append((COST, f"{ex.cost:.10f}".rstrip("0").rstrip(".").encode() or b"0"))
    return response


async def _route(state: RouterState, endpoint: Endpoint, ex: Exchange, client: Client, scope: Scope,
                 receive: Receive) -> tuple[Response | SSEResponse, list[tuple[bytes, bytes]]]:
    call = endpoint.parse(await read_body(scope, receive, state.settings.max_body_bytes))
    if endpoint.prepare is not None:
        call = await endpoint.prepare(state, ex, call)
    ex.payload = call.payload
    ex.stream = call.stream
    if ex.log_content:
        ex.request_body = call.body
    group = state.routes.resolve(call.model)
    name = group.name or call.model  # the group's name; a prefix rule's shared group has none
    ex.model = name
    allowed(client, call.model, name)
    then = alternatives(state, client, call) if endpoint.model_lists and "models" in call.payload else ()
    # the group's own limits count every name it goes by
    limit_headers = await state.limiter.check(
        client, call if name == call.model else dataclasses.replace(call, model=name))
    return await answer_unless_gone(state, client, group, name, call, scope, then, ex), limit_headers


def settle_stream(state: RouterState, ex: Exchange, response: SSEResponse) -> None:
    """A stream's usage and cost once it ended, and its failure, if it ended with an error event."""
    if response.failure is not None:
        ex.error_code = response.failure.code
    tap = response.tap
    events = tap.events if isinstance(tap, UsageTap) else 0  # (a cached replay has none)
    if isinstance(tap, UsageTap) and tap.keep is not None:
        ex.response_body = b"".join(tap.keep)
    state.observer.settle(ex, response.usage, ex.payload, ex.target, max(0, events - 2))


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
                             scope: Scope, then: tuple[ModelGroup, ...],
                             ex: Exchange | None = None) -> Response | SSEResponse:
    """`answer`, cancelled as soon as the client's connection is lost (the server's `Disconnects`): the upstream
    call is given up instead of running to its end for nobody (a stream's relay watches on its own later)."""
    disconnects: Disconnects | None = (scope.get("extensions") or {}).get(DISCONNECTS, {}).get("connection")
    if disconnects is None:
        return await answer(state, client, group, name, call, scope, then, ex)
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
        return await answer(state, client, group, name, call, scope, then, ex)
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
                 scope: Scope, then: tuple[ModelGroup, ...] = (), ex: Exchange | None = None) -> Response | SSEResponse:
    """From the cache when it may and can (no deployment is involved then), else from one of the group's
    deployments, or of the groups after it (and stored when it may)."""
    read, write = state.cache.policy(call, scope)
    if not (read or write):
        return await state.dispatcher.send(group, call, client, then, ex)
    key = state.cache.key(client, name, call)
    if read:
        cached = await state.cache.lookup(key, call)
        if cached is not None:
            cached.raw_headers.append(NO_ATTEMPTS)
            if ex is not None:
                ex.cache_hit = True
            return cached
    response = await state.dispatcher.send(group, call, client, then, ex)
    if write:
        state.cache.record(key, response, call.op)
    return response
