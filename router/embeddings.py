"""OpenAI's embeddings format, for deployments that make embeddings themselves (Gemini's translation, weights in
this process): a request's inputs as a list, base64 encoding (little-endian float32, as OpenAI's), and the
`CreateEmbeddingResponse` body."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson


def is_tokens(value: Any) -> bool:
    """A non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           and t >= 0 for t in value)


def inputs_of(payload: dict[str, Any]) -> list[Any]:
    """The request's inputs as a list: strings, or token-id lists."""
    value = payload["input"]
    if isinstance(value, str) or is_tokens(value):
        return [value]
    return list(value)


def to_base64(vector: list[float]) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_response(vectors: list[list[float]], model: str, prompt_tokens: int, encoding: str) -> bytes:
    """OpenAI's `CreateEmbeddingResponse`."""
    data = [{"object": "embedding", "index": i, "embedding": to_base64(v) if encoding == "base64" else v}
            for i, v in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
