"""OpenRouter: OpenAI-compatible pass-through at `OPENROUTER_BASE_URL`
(default https://openrouter.ai/api), key `EXTERNAL_OPENROUTER_KEY`. The optional
`OPENROUTER_REFERER` and `OPENROUTER_TITLE` are sent as `HTTP-Referer` and
`X-Title`, OpenRouter's app attribution headers."""

from __future__ import annotations

from router.providers.openai import OpenAICompatibleProvider


class OpenRouterProvider(OpenAICompatibleProvider):
    type = "openrouter"
    url_var = "OPENROUTER_BASE_URL"
    key_var = "EXTERNAL_OPENROUTER_KEY"

    def extra_headers(self) -> dict[str, str]:
        headers = {}
        if self.settings is not None and self.settings.openrouter_referer:
            headers["HTTP-Referer"] = self.settings.openrouter_referer
        if self.settings is not None and self.settings.openrouter_title:
            headers["X-Title"] = self.settings.openrouter_title
        return headers
