"""OpenAI's Responses API: `POST /v1/responses` routed as chat is (`router.api.routed`); deployments that serve
it (OpenAI itself) pass it through, every other one translates to and from chat completions
(`router.providers.responses_format`). For translated answers, `store` (the API's default: true) keeps the
response (`router.responses_store`) for `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`, each
visible only to the key that made it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.api.body import parse_object
from router.api.chat import model_of, stream_of
from router.api.routed import Endpoint
from router.errors import RouterError
from router.observability.exchange import Exchange
from router.providers.base import ChatCall
from router.state import RouterState

_background: set[asyncio.Task[None]] = set()


def parse_responses(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = model_of(payload)
    value = payload.get("input")
    if value is None:
        raise RouterError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
        raise RouterError(400, "'input' must be a string or a non-empty array of input items.", param="input",
                          code="invalid_type")
    if payload.get("store") is not None and not isinstance(payload["store"], bool):
        raise RouterError(400, "'store' must be a boolean.", param="store", code="invalid_type")
    previous = payload.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise RouterError(400, "'previous_response_id' must be a string.", param="previous_response_id",
                          code="invalid_type")
    stream, _ = stream_of(payload)
    return ChatCall(model, payload, body, stream, False, "responses")


async def prepare(state: RouterState, ex: Exchange, call: ChatCall) -> ChatCall:
    """The stored conversation `previous_response_id` continues, and where to store this answer."""
    store, owner = state.responses_store, ex.client
    context: dict[str, Any] = {}
    previous = call.payload.get("previous_response_id")
    if previous:
        found = await store.get(previous, owner)
        if found is not None:
            context["history"] = found[1]
    if call.payload.get("store", True):
        def save(response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
            task = asyncio.get_running_loop().create_task(store.put(response_id, owner, response, messages))
            _background.add(task)
            task.add_done_callback(_background.discard)

        context["save"] = save
    call.context = context
    return call


RESPONSES = Endpoint("/v1/responses", parse_responses, prepare=prepare)


def _missing(response_id: str) -> RouterError:
    return RouterError(404, f"Response with id '{response_id}' not found.", param="response_id",
                       code="response_not_found")


async def get_response(request: Request) -> Response:
    state: RouterState = request.app.state.router
    client = state.keys.authenticate(request.scope)
    response_id = request.path_params["response_id"]
    found = await state.responses_store.get(response_id, client.label)
    if found is None:
        raise _missing(response_id)
    return Response(orjson.dumps(found[0]), media_type="application/json")


async def delete_response(request: Request) -> Response:
    state: RouterState = request.app.state.router
    client = state.keys.authenticate(request.scope)
    response_id = request.path_params["response_id"]
    if not await state.responses_store.delete(response_id, client.label):
        raise _missing(response_id)
    return Response(orjson.dumps({"id": response_id, "object": "response", "deleted": True}),
                    media_type="application/json")
