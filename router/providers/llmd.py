"""llm-d: an OpenAI-compatible inference gateway in front of a vLLM cluster, at
`LLMD_ENDPOINT`. No key by default; `LLMD_API_KEY` is sent as a bearer token
when the gateway is configured to require one."""

from __future__ import annotations

from router.providers.openai import OpenAICompatibleProvider


class LlmdProvider(OpenAICompatibleProvider):
    type = "llm-d"
    url_var = "LLMD_ENDPOINT"
    key_var = "LLMD_API_KEY"
    needs_key = False
