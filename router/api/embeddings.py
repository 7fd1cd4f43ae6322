"""`POST /v1/embeddings`, routed as chat is (`router.api.routed`): OpenAI-compatible deployments (OpenAI,
OpenRouter, agents' vLLM workers, llm-d, any registered server) pass the bytes through; Gemini is translated
(`batchEmbedContents`); `huggingface` deployments embed in the router's process. Embeddings are deterministic,
so the response cache keeps them by default (`CACHE_MODE=deterministic`).

`parse_embeddings` checks what OpenAI checks: `input` a string, strings, a token array or token arrays (at most
2048 items, none empty), `encoding_format` float or base64, `dimensions` a positive integer."""

from __future__ import annotations

from typing import Any

from router.api.body import parse_object
from router.api.chat import model_of
from router.api.routed import Endpoint
from router.errors import RouterError
from router.embeddings import is_tokens as _tokens
from router.providers.base import ChatCall

MAX_INPUTS = 2048


def _bad(message: str, param: str, code: str = "invalid_value") -> RouterError:
    return RouterError(400, message, param=param, code=code)




def check_input(value: Any) -> None:
    if value is None:
        raise _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(value, str):
        if not value:
            raise _bad("'input' cannot be an empty string.", "input")
        return
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string, an array of strings, an array of token ids or an array of token id "
                   "arrays, and not empty.", "input", "invalid_type")
    if len(value) > MAX_INPUTS:
        raise _bad(f"'input' may hold at most {MAX_INPUTS} items; it has {len(value)}.", "input")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise _bad(f"'input[{i}]' cannot be an empty string.", f"input[{i}]")
        return
    if _tokens(value) or all(_tokens(v) for v in value):
        return
    raise _bad("'input' must be a string, an array of strings, an array of token ids or an array of token id "
               "arrays; it mixes them.", "input", "invalid_type")


def parse_embeddings(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = model_of(payload)
    check_input(payload.get("input"))
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise _bad("'dimensions' must be a positive integer.", "dimensions")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user", "invalid_type")
    return ChatCall(model, payload, body, False, False, "embeddings")


EMBEDDINGS = Endpoint("/v1/embeddings", parse_embeddings)
