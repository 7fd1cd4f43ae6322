"""OpenAI and any OpenAI-compatible endpoint: the body passes through untouched,
SSE is relayed chunk by chunk, connections come from the shared keep-alive pool.

`OpenAICompatibleProvider` is the pass-through the whole OpenAI-compatible
family shares (OpenRouter, Grok, Groq, Venice, llm-d, and registry entries of
type `openai` on any host). Because bytes are relayed, every provider-specific
extra field in a response (OpenRouter's `provider`, Groq's `x_groq`, extra
`usage` keys, ...) reaches the client unchanged; the SDKs ignore what they
don't know.
"""

from __future__ import annotations

from starlette.responses import Response
from yarl import URL

from router.providers.base import ApiProvider, ChatCall


class OpenAICompatibleProvider(ApiProvider):
    """Forwards the client's exact bytes to `{base}/v1/chat/completions`."""

    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    async def chat(self, call: ChatCall) -> Response:
        url = getattr(self, "_url", None)
        if url is None:
            url = self._url = URL(self.chat_url(), encoded=True)  # parsed once
        return await self.http.forward(self.type, url, call.body, self.headers(), call.stream)


class OpenAIProvider(OpenAICompatibleProvider):
    type = "openai"
    url_var = "OPENAI_BASE_URL"
    key_var = "EXTERNAL_OPENAI_KEY"
