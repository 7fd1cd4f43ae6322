"""Venice: OpenAI-compatible pass-through at `VENICE_BASE_URL`
(default https://api.venice.ai/api), key `EXTERNAL_VENICE_KEY`."""

from __future__ import annotations

from router.providers.openai import OpenAICompatibleProvider


class VeniceProvider(OpenAICompatibleProvider):
    type = "venice"
    url_var = "VENICE_BASE_URL"
    key_var = "EXTERNAL_VENICE_KEY"
