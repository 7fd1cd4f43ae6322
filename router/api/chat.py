"""`POST /v1/chat/completions`: the body parsed once with orjson and the few fields routing needs checked
(`parse_chat`); everything else is the routed endpoints' shared way (`router.api.routed`). Nothing is
validated into models or re-serialized: providers get the parsed dict and the original bytes."""

from __future__ import annotations

from typing import Any

from router.api.body import parse_object
from router.api.routed import Endpoint
from router.errors import RouterError
from router.providers.base import ChatCall

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_chat(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = model_of(payload, lists=True)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        msg = "Missing required parameter: 'messages'." if messages is None else "'messages' must be a non-empty array"
        raise RouterError(400, msg, param="messages",
                          code="missing_required_parameter" if messages is None else "invalid_value")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RouterError(400, f"Invalid type for 'messages[{i}]': expected an object.",
                              param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RouterError(400, f"Invalid value for 'messages[{i}].role': {role!r}. "
                              f"Supported values are: {', '.join(sorted(ROLES))}.",
                              param=f"messages[{i}].role", code="invalid_value")
    stream, include_usage = stream_of(payload)
    return ChatCall(model, payload, body, stream, include_usage)


def model_of(payload: dict[str, Any], lists: bool = False) -> str:
    """The request's `model` (400 unless a non-empty string); with `lists`, OpenRouter's `models` list alone
    names it (the model, then its fallbacks)."""
    model = payload.get("model")
    if model is None and lists and "models" in payload:
        listed = payload["models"]
        model = listed[0] if isinstance(listed, list) and listed else None
    if not isinstance(model, str) or not model.strip():
        msg = "you must provide a model parameter" if model is None else "'model' must be a non-empty string"
        raise RouterError(400, msg, param="model",
                          code="invalid_value" if model is not None else "missing_required_parameter")
    return model


def stream_of(payload: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, whether the client asked for the stream's usage), each checked (400)."""
    stream = payload.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise RouterError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RouterError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return stream, bool(stream and options and options.get("include_usage") is True)


CHAT = Endpoint("/v1/chat/completions", parse_chat, model_lists=True)
