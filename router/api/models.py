"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's list format: registry
models, models announced by live agents, and the built-in `dummy`."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.errors import RouterError
from router.state import RouterState

_BOOT = 0  # `created` of the built-in dummy model


def _catalogue(state: RouterState) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"dummy": {"id": "dummy", "object": "model", "created": _BOOT,
                                                "owned_by": "router"}}
    for m in state.models:
        out[m.name] = {"id": m.name, "object": "model", "created": int(m.created_at), "owned_by": m.type}
    for agent in state.agents.live():
        for name in agent.models:
            out.setdefault(name, {"id": name, "object": "model", "created": int(agent.registered_at),
                                  "owned_by": f"agent:{agent.name}"})
    return out


async def list_models(request: Request) -> Response:
    state: RouterState = request.app.state.router
    data = sorted(_catalogue(state).values(), key=lambda m: m["id"])
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


async def get_model(request: Request) -> Response:
    state: RouterState = request.app.state.router
    model_id = request.path_params["model_id"]
    entry = _catalogue(state).get(model_id)
    if entry is None:
        raise RouterError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
    return Response(orjson.dumps(entry), media_type="application/json")
