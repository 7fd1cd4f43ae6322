"""The ASGI application: routes, error handlers, and the process lifespan.

`create_app` is the uvicorn factory (`router serve` runs it in each worker). Its lifespan hands the
worker's stop signals to `router.shutdown.Drain` (`/ready` turns 503, a delay, then uvicorn's drain).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from router.api import agents, health, models, routed
from router.api.chat import CHAT
from router.api.completions import COMPLETIONS
from router.api.embeddings import EMBEDDINGS
from router.api.messages import MESSAGES, count as count_tokens
from router.api.responses import RESPONSES, delete_response, get_response
from router.config import Settings, get_settings
from router.errors import RouterError, error_body, http_error_response, router_error_response
from router.observability import setup_logging
from router.server import RouterHttpProtocol
from router.shutdown import Drain
from router.state import RouterState

log = logging.getLogger("router")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(error_body("The server had an error while processing your request.", 500,
                               code="internal_error"), 500, media_type="application/json")


def create_app(settings: Settings | None = None) -> RouterApp:
    settings = settings or get_settings()
    setup_logging(settings)
    RouterHttpProtocol.configure(settings)  # `router serve`'s protocol, in this worker
    state = RouterState(settings)
    drain = Drain(settings.shutdown_delay, settings.shutdown_grace_period)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        drain.install()
        log.info("router ready: registry %s, %d models", state.store.location, len(state.snapshot.groups))
        try:
            yield
        finally:
            drain.uninstall()
            await state.stop()

    app = Starlette(
        routes=[
            *(Route(path, _routed_route, methods=["POST"]) for path in ROUTED),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
            Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
            Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
            Route("/v1/models", models.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
            Route("/register", agents.register, methods=["POST"]),
            Route("/heartbeat", agents.heartbeat, methods=["POST"]),
            Route("/health", health.health, methods=["GET"]),
            Route("/health/deployments", health.deployments, methods=["GET"]),
            Route("/ready", health.ready, methods=["GET"]),
            Route("/metrics", health.metrics, methods=["GET"]),
        ],
        exception_handlers={RouterError: router_error_response, HTTPException: http_error_response,
                            Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.router = state
    app.state.shutdown = drain  # `/ready` reads its `draining`
    return RouterApp(app, state, drain)


#: the routed endpoints (`router.api.routed`), by path
ROUTED: dict[str, routed.Endpoint] = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES)}


async def _routed_route(request: Request) -> Response:
    """Never called: RouterApp takes POST first. The route exists so that other
    methods on these paths get Starlette's 405 rather than a 404."""
    raise RouterError(405, "Method Not Allowed")


class RouterApp:
    """The ASGI entry point: a POST to a routed endpoint (`ROUTED`) goes straight to its handler; everything
    else (and the lifespan) goes through Starlette."""

    def __init__(self, app: Starlette, state: RouterState, drain: Drain) -> None:
        self.app = app
        self.state = state
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            endpoint = ROUTED.get(scope["path"]) if scope["type"] == "http" else None
            if endpoint is not None and scope["method"] == "POST":
                await routed.handle(self.state, endpoint, scope, receive, send)
            else:
                await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.drain.cut:
                raise
            # the grace period is over: the server answered this request's client and closed the connection
            # (RouterHttpProtocol.cut_all), then cancelled it; that is its end, not an error to log
