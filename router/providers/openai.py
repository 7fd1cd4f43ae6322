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

from typing import TYPE_CHECKING

from starlette.responses import Response
from yarl import URL

from router.providers.base import ApiProvider, ChatCall, same_origin
from router.upstream import SSEResponse

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.config import Settings
    from router.upstream import UpstreamClient


class OpenAICompatibleProvider(ApiProvider):
    """Forwards the client's exact bytes to `{base}/v1/chat/completions`."""

    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        url = getattr(self, "_url", None)
        if url is None:
            url = self._url = URL(self.chat_url(), encoded=True)  # parsed once
        return await self.http.forward(self.type, url, call.body, self.headers(), call.stream)

    async def embeddings(self, call: ChatCall) -> Response:
        """`/v1/embeddings`, passed through; the answer must be a list of embeddings."""
        answer = await self.http.forward(self.type, self.base_url + "/v1/embeddings", call.body, self.headers(),
                                         False, "data")
        assert not isinstance(answer, SSEResponse)
        return answer

    #: whether the upstream serves OpenAI's Responses API itself (then `/v1/responses` passes through)
    serves_responses = False

    async def responses(self, call: ChatCall) -> Response | SSEResponse:
        if not self.serves_responses:
            return await super().responses(call)
        url = self.base_url + "/v1/responses"
        http = self.http
        resp = await http.open(self.type, url, call.body, self.headers())
        if resp.status >= 400:
            raise http.error_from(self.type, resp, await http.read(self.type, url, resp))
        if call.stream:
            return http.relay(self.type, url, resp, http.lines(self.type, resp, b"response."))
        return await http.forward_read(self.type, url, resp, "output")

    async def completions(self, call: ChatCall) -> Response | SSEResponse:
        """The legacy `/v1/completions`, passed through, streams as they come."""
        return await self.http.forward(self.type, self.base_url + "/v1/completions", call.body, self.headers(),
                                       call.stream)


class OpenAIProvider(OpenAICompatibleProvider):
    """OpenAI at `OPENAI_BASE_URL` reads `max_completion_tokens` itself; an `openai`-type entry elsewhere is
    an OpenAI-compatible server and gets `max_tokens`."""

    type = "openai"
    url_var = "OPENAI_BASE_URL"
    key_var = "EXTERNAL_OPENAI_KEY"

    def __init__(self, http: UpstreamClient, base_url: str, api_key: SecretStr | None = None,
                 *, key_required: bool = True, settings: Settings | None = None) -> None:
        super().__init__(http, base_url, api_key, key_required=key_required, settings=settings)
        official = settings.openai_base_url if settings is not None else "https://api.openai.com"
        if official and same_origin(self.base_url, official):
            self.max_tokens_param = None
            self.serves_responses = True  # OpenAI's own API: /v1/responses passes through
