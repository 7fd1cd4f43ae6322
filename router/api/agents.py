"""Agent announcements: `POST /register` and `POST /heartbeat`.

Guarded by `ROUTER_AGENT_TOKEN` when it is set; payloads are checked here and
a bad field answers 422 naming it."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.errors import RouterError
from router.registry import RegistryError, validate_url
from router.state import RouterState

MAX_AGENT_BODY = 1024 * 1024


def _authorize(request: Request, state: RouterState) -> None:
    token = state.settings.router_agent_token
    if token is None:
        return
    if state.keys.is_admin(request.scope):  # the master key administers agents too
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise RouterError(401, "A valid agent token is required: send 'Authorization: Bearer <ROUTER_AGENT_TOKEN>'.",
                          code="invalid_api_key")


async def _payload(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_AGENT_BODY:
        raise RouterError(413, "Agent payload too large.", code="request_too_large")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"Invalid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RouterError(422, "The payload must be a JSON object.", code="invalid_payload")
    return data


def _name(data: dict[str, Any]) -> str:
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RouterError(422, "'name' must be a non-empty string.", param="name", code="invalid_value")
    return name.strip()


async def register(request: Request) -> Response:
    state: RouterState = request.app.state.router
    _authorize(request, state)
    data = await _payload(request)
    name = _name(data)
    endpoint = data.get("endpoint")
    try:
        endpoint = validate_url(endpoint, "'endpoint'") if isinstance(endpoint, str) else None
    except RegistryError as exc:
        raise RouterError(422, str(exc), param="endpoint", code="invalid_value") from None
    if endpoint is None:
        raise RouterError(422, "'endpoint' must be an http(s) URL.", param="endpoint", code="invalid_value")
    models = data.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise RouterError(422, "'models' must be a list of non-empty strings.", param="models", code="invalid_value")
    models = list(dict.fromkeys(m.strip() for m in models))
    entry = await state.register_agent(name, endpoint, models)
    return Response(orjson.dumps({"status": "registered", "name": entry.name, "models": list(entry.models),
                                  "heartbeat_ttl": state.settings.agent_ttl}), media_type="application/json")


async def heartbeat(request: Request) -> Response:
    state: RouterState = request.app.state.router
    _authorize(request, state)
    name = _name(await _payload(request))
    if not await state.heartbeat(name):
        raise RouterError(404, f"Agent '{name}' is not registered; register again.", param="name",
                          code="agent_not_found")
    return Response(orjson.dumps({"status": "ok", "name": name}), media_type="application/json")
