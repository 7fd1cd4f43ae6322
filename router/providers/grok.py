"""Grok and Groq, both OpenAI-compatible pass-throughs.

`grok` models are xAI's: `GROK_BASE_URL` defaults to https://api.x.ai with key
`EXTERNAL_GROK_KEY`. Older setups point `GROK_BASE_URL` at Groq
(https://api.groq.com, as the design's sample .env does); Groq serves its
OpenAI-compatible API under `/openai`, so that bare host is completed to it.
`groq` is Groq's own type: `GROQ_BASE_URL` (https://api.groq.com/openai),
`EXTERNAL_GROQ_KEY`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from router.providers.openai import OpenAICompatibleProvider

GROQ_HOST = "api.groq.com"


def groq_api_base(base_url: str) -> str:
    """https://api.groq.com -> https://api.groq.com/openai (other URLs unchanged)."""
    parts = urlsplit(base_url)
    if parts.hostname == GROQ_HOST and parts.path in ("", "/"):
        return base_url.rstrip("/") + "/openai"
    return base_url


class GrokProvider(OpenAICompatibleProvider):
    type = "grok"
    url_var = "GROK_BASE_URL"
    key_var = "EXTERNAL_GROK_KEY"
    max_tokens_param = None  # xAI's and Groq's APIs read `max_completion_tokens` (max_tokens: deprecated)

    def chat_url(self) -> str:
        return groq_api_base(self.base_url) + "/v1/chat/completions"


class GroqProvider(GrokProvider):
    type = "groq"
    url_var = "GROQ_BASE_URL"
    key_var = "EXTERNAL_GROQ_KEY"
