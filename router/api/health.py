"""Liveness (`/health`), readiness (`/ready`: the registry is readable; `models`
counts what is served: model groups and aliases, the built-in `dummy`, live
agents' models) and `/metrics`."""

from __future__ import annotations

import sqlite3

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from router.api.models import catalogue
from router.errors import RouterError
from router.state import RouterState


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def ready(request: Request) -> Response:
    state: RouterState = request.app.state.router
    try:
        await state.read(lambda conn: conn.execute("SELECT count(*) FROM model_groups").fetchone())
    except (sqlite3.Error, OSError) as exc:
        raise RouterError(503, f"registry not readable: {exc.__class__.__name__}", code="not_ready") from None
    return Response(orjson.dumps({"status": "ready", "models": len(catalogue(state))}),
                    media_type="application/json")


async def metrics(request: Request) -> Response:
    state: RouterState = request.app.state.router
    if state.settings.metrics_require_key and not state.keys.is_admin(request.scope):
        raise RouterError(401, "/metrics needs the master key: send 'Authorization: Bearer <ROUTER_MASTER_KEY>'.",
                          code="invalid_api_key")
    return Response(state.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})
