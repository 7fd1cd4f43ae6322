"""Liveness (`/health`), readiness (`/ready`: the registry was read lately and
Redis, when configured, answers, as the registry watch and the Redis link last
saw; `models` counts what is served: model groups and aliases, the built-in
`dummy`, live agents' models) and `/metrics`."""

from __future__ import annotations

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
    if request.app.state.shutdown.draining:  # SIGTERM came (router.shutdown): off the load balancer
        raise RouterError(503, "not ready: shutting down", code="shutting_down")
    state: RouterState = request.app.state.router
    reason = state.readiness()  # from what the registry watch and the Redis link keep: no I/O per call
    if reason is not None:
        raise RouterError(503, f"not ready: {reason}", code="not_ready")
    return Response(orjson.dumps({"status": "ready", "models": len(catalogue(state))}),
                    media_type="application/json")


async def metrics(request: Request) -> Response:
    state: RouterState = request.app.state.router
    if state.settings.metrics_require_key and not state.keys.is_admin(request.scope):
        raise RouterError(401, "/metrics needs the master key: send 'Authorization: Bearer <ROUTER_MASTER_KEY>'.",
                          code="invalid_api_key")
    state.deployment_health()  # the circuits' states into their gauge, at scrape time
    return Response(state.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})


async def deployments(request: Request) -> Response:
    """`GET /health/deployments`: each deployment's circuit, failures and when it returns. The master key
    only (with no master key configured: loopback clients only)."""
    state: RouterState = request.app.state.router
    if not state.keys.is_admin(request.scope):
        client = request.scope.get("client")
        loopback = client is not None and client[0] in ("127.0.0.1", "::1")
        if state.keys.enabled or not loopback:
            raise RouterError(401, "/health/deployments needs the master key: send 'Authorization: Bearer "
                              "<ROUTER_MASTER_KEY>'.", code="invalid_api_key")
    return Response(orjson.dumps({"object": "list", "data": state.deployment_health()}),
                    media_type="application/json")
