"""Agent announcements: `POST /register` and `POST /heartbeat`.

Each needs an agent credential (see `router.agent_policy`); the agent's name
is bound to the credential that registered it (403 for any other). A
registration is rate-limited per client address (`AGENT_REGISTER_RPM`, 429),
its endpoint must not point at link-local or metadata addresses (or outside
`ROUTER_AGENT_NETWORKS`), and it may not announce a hosted provider's model
name unless allowed (403). A bad field answers 422 naming it; a locked
registry 503 with Retry-After."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.agent_policy import Credential
from router.auth import bearer
from router.errors import RouterError
from router.ratelimit import Limit
from router.registry import AgentNameTaken, RegistryError, validate_url
from router.state import RouterState

MAX_AGENT_BODY = 1024 * 1024


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _credential(request: Request, state: RouterState) -> Credential:
    host = _client_host(request)
    credential = state.agent_policy.identify(bearer(request.scope), host)
    state.agent_policy.check_client(host)
    return credential


def _rate_limit(request: Request, state: RouterState) -> None:
    rpm = state.settings.agent_register_rpm
    limit = Limit(f"agent-register:{_client_host(request)}", "requests", "client", rpm, 1)
    outcome = state.agent_register_limits.check([limit])[0]
    if not outcome.allowed:
        raise RouterError(429, f"Too many agent registrations from this address: {rpm} per minute "
                          "(AGENT_REGISTER_RPM).", code="rate_limit_exceeded",
                          headers={"Retry-After": str(max(1, math.ceil(outcome.wait)))})


def _taken(name: str) -> RouterError:
    return RouterError(403, f"The agent name '{name}' is registered with another credential; use that "
                       "credential or another name.", param="name", code="agent_name_taken")


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
    _rate_limit(request, state)
    credential = _credential(request, state)
    data = await _payload(request)
    name = _name(data)
    if "endpoint" not in data:
        raise RouterError(422, "'endpoint' must be an http(s) URL.", param="endpoint", code="invalid_value")
    try:
        endpoint = validate_url(data["endpoint"], "'endpoint'")
    except RegistryError as exc:
        raise RouterError(422, str(exc), param="endpoint", code="invalid_value") from None
    models = data.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise RouterError(422, "'models' must be a list of non-empty strings.", param="models", code="invalid_value")
    models = list(dict.fromkeys(m.strip() for m in models))
    local_entries = state.routes.local_groups()
    refused = state.agent_policy.hosted_names(credential, models, local_entries)
    if refused:
        names = ", ".join(refused)
        raise RouterError(
            403, f"Agents may not serve {names}: hosted providers serve these names (prefix rules). To let "
            f"agents serve them, set ROUTER_AGENT_ALLOWED_MODELS={','.join(refused)} (or '*'), issue this agent a "
            f"token with `router create-agent-token NAME --models {','.join(refused)}`, or add each to the "
            "registry as type local (`router add-model NAME local ENDPOINT weight`).",
            param="models", code="model_not_allowed")
    await state.agent_policy.check_endpoint(endpoint)
    try:
        entry = await state.register_agent(name, endpoint, models, credential)
    except AgentNameTaken:
        raise _taken(name) from None
    return Response(orjson.dumps({"status": "registered", "name": entry.name, "models": list(entry.models),
                                  "heartbeat_ttl": state.settings.agent_ttl}), media_type="application/json")


async def heartbeat(request: Request) -> Response:
    state: RouterState = request.app.state.router
    credential = _credential(request, state)
    name = _name(await _payload(request))
    try:
        known = await state.heartbeat(name, credential)
    except AgentNameTaken:
        raise _taken(name) from None
    if not known:
        raise RouterError(404, f"Agent '{name}' is not registered; register again.", param="name",
                          code="agent_not_found")
    return Response(orjson.dumps({"status": "ok", "name": name}), media_type="application/json")
