"""`POST /v1/completions`, the legacy text completions of OpenAI-compatible and local deployments (vLLM and
llama.cpp serve it), streaming included, routed as chat is (`router.api.routed`); deployments that translate
another API (Anthropic, Gemini) answer a clear 400 (`Provider.completions`)."""

from __future__ import annotations

from router.api.body import parse_object
from router.api.chat import model_of, stream_of
from router.api.routed import Endpoint
from router.errors import RouterError
from router.providers.base import ChatCall


def parse_completions(body: bytes) -> ChatCall:
    payload = parse_object(body)
    model = model_of(payload)
    prompt = payload.get("prompt")
    if prompt is None:
        raise RouterError(400, "Missing required parameter: 'prompt'.", param="prompt",
                          code="missing_required_parameter")
    if not _prompt_ok(prompt):
        raise RouterError(400, "'prompt' must be a string, an array of strings, an array of token ids, or an "
                          "array of token id arrays.", param="prompt", code="invalid_type")
    stream, include_usage = stream_of(payload)
    return ChatCall(model, payload, body, stream, include_usage, "completions")


def _prompt_ok(prompt: object) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return True
    return all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt)


COMPLETIONS = Endpoint("/v1/completions", parse_completions)
