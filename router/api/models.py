"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's list format: model
groups and their aliases, models announced by live agents, and the built-in
`dummy`. Keys are checked as for chat (401), and a key with an allow-list sees
only its models.

`owned_by` is the registry type of a group's deployments ("router" when they
differ), except that an `openai` entry away from OpenAI's own origin
(`OPENAI_BASE_URL`) says `openai-compatible`: a llama.cpp or vLLM server
speaking OpenAI's API is not OpenAI's. Where known, an entry also carries what
OpenRouter's model list has and clients read: `context_length` (the largest
window among the group's deployments) and `pricing` (USD per token, as
strings: the cheapest deployment whose prices are both known)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.errors import RouterError
from router.providers.base import same_origin
from router.state import RouterState

_BOOT = 0  # `created` of the built-in dummy model


def owned_by(type_: str, endpoint: str, openai_base_url: str | None) -> str:
    if type_ == "openai" and endpoint and not (openai_base_url and same_origin(endpoint, openai_base_url)):
        return "openai-compatible"
    return type_


def catalogue(state: RouterState) -> dict[str, dict[str, Any]]:
    """Every model this process serves now, by name: registry groups and their aliases, live agents' models."""
    out: dict[str, dict[str, Any]] = {"dummy": {"id": "dummy", "object": "model", "created": _BOOT,
                                                "owned_by": "router"}}
    base = state.settings.openai_base_url
    snapshot = state.snapshot
    owners: dict[str, set[str]] = {}
    for d in snapshot.deployments:
        owners.setdefault(d.group, set()).add(owned_by(d.type, d.endpoint, base))
    for g in snapshot.groups:
        owner = owners.get(g.name, set())
        out[g.name] = {"id": g.name, "object": "model", "created": int(g.created_at),
                       "owned_by": next(iter(owner)) if len(owner) == 1 else "router", **_details(state, g.name)}
    for alias, target in snapshot.aliases.items():
        if alias not in out and target in out:
            out[alias] = {**out[target], "id": alias}
    for agent in state.agents.live():
        for name in agent.models:
            out.setdefault(name, {"id": name, "object": "model", "created": int(agent.registered_at),
                                  "owned_by": f"agent:{agent.name}"})
    return out


def _details(state: RouterState, name: str) -> dict[str, Any]:
    """`context_length` and `pricing` of a group, from its routable deployments (prices resolved)."""
    try:
        deployments = state.routes.resolve(name).deployments
    except RouterError:
        return {}
    out: dict[str, Any] = {}
    windows = [d.context_window for d in deployments if d.context_window]
    if windows:
        out["context_length"] = max(windows)
    priced = [(d.input_price, d.output_price) for d in deployments
              if d.input_price is not None and d.output_price is not None]
    if priced:
        prompt, completion = min(priced, key=lambda p: (p[0] or 0) + (p[1] or 0))
        out["pricing"] = {"prompt": _per_token(prompt), "completion": _per_token(completion)}
    return out


def _per_token(per_million: float | None) -> str:
    return f"{(per_million or 0) / 1_000_000:.12f}".rstrip("0").rstrip(".") or "0"


def _visible(state: RouterState, request: Request) -> dict[str, dict[str, Any]]:
    """The catalogue as this client may see it (401 for a missing or wrong key, as chat)."""
    client = state.keys.authenticate(request.scope)
    models = catalogue(state)
    allowed = client.key.models if client.key is not None else None
    if allowed is not None:
        models = {name: entry for name, entry in models.items() if name in allowed}
    return models


async def list_models(request: Request) -> Response:
    state: RouterState = request.app.state.router
    models = _visible(state, request)
    data = sorted(models.values(), key=lambda m: m["id"])
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def get_model(request: Request) -> Response:
    state: RouterState = request.app.state.router
    model_id = request.path_params["model_id"]
    entry = _visible(state, request).get(model_id)
    if entry is None:
        raise RouterError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
    return Response(orjson.dumps(entry), media_type="application/json")
