"""Anthropic's Messages API at `POST /v1/messages` (and `/v1/messages/count_tokens`), so the `anthropic` SDK and
Claude Code can use any model of the registry: routed as chat is (`router.api.routed`: keys, given as `x-api-key`
or `Authorization`, budgets, limits, routing, fallbacks, metrics, the request log), errors in Anthropic's shape.
The dispatcher calls each deployment's `messages`: Anthropic's pass the bytes through; every other provider
translates (`router.providers.anthropic_messages`)."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router.api.body import parse_object, read_body
from router.api.routed import Endpoint, allowed
from router.errors import RouterError
from router.providers.anthropic_messages import check, count_tokens, error_body
from router.providers.base import ApiProvider, ChatCall
from router.state import RouterState


def parse_messages(body: bytes) -> ChatCall:
    payload = parse_object(body)
    check(payload)
    return ChatCall(payload["model"], payload, body, bool(payload.get("stream")), False, "messages")


def anthropic_error(exc: RouterError) -> Response:
    """A RouterError as Anthropic answers errors (`{"type": "error", "error": {"type", "message"}}`)."""
    return Response(error_body(exc.status, exc.message), exc.status, headers=exc.headers,
                    media_type="application/json")


MESSAGES = Endpoint("/v1/messages", parse_messages, error=anthropic_error)


async def count(request: Request) -> Response:
    """`POST /v1/messages/count_tokens`: Anthropic's own count for a group served by Anthropic, else an estimate
    (about 4 characters a token)."""
    state: RouterState = request.app.state.router
    try:
        client = state.keys.authenticate(request.scope)
        payload = parse_object(await read_body(request.scope, request.receive, state.settings.max_body_bytes))
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise RouterError(400, "model: Field required", param="model")
        group = state.routes.resolve(model)
        allowed(client, model, group.name or model)
        first = group.deployments[0] if group.deployments else None
        if first is not None and first.type == "anthropic" and isinstance(first.provider, ApiProvider):
            provider = first.provider
            body = orjson.dumps({**payload, "model": first.upstream_model})
            url = provider.base_url + "/v1/messages/count_tokens"
            resp = await provider.http.open("anthropic", url, body, provider.headers())
            data = await provider.http.read("anthropic", url, resp)
            if resp.status >= 400:
                raise provider.http.error_from("anthropic", resp, data)
            return Response(data, media_type="application/json")
        tokens = count_tokens({**payload, "max_tokens": payload.get("max_tokens") or 1})
        return Response(orjson.dumps({"input_tokens": tokens}), media_type="application/json")
    except RouterError as exc:
        return anthropic_error(exc)
