"""OpenAI and any OpenAI-compatible endpoint: the body passes through untouched,
SSE is relayed chunk by chunk, connections come from the shared keep-alive pool.

The key (`EXTERNAL_OPENAI_KEY`) is sent only to the origin of `OPENAI_BASE_URL`;
a registry entry pointing elsewhere (a vLLM server, say) gets no key, so the
OpenAI key never leaks to a third party.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response
from yarl import URL

from router.providers.base import ApiProvider, ChatCall

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.upstream import UpstreamClient


class OpenAIProvider(ApiProvider):
    type = "openai"
    url_var = "OPENAI_BASE_URL"
    key_var = "EXTERNAL_OPENAI_KEY"

    def __init__(self, http: UpstreamClient, base_url: str, api_key: SecretStr | None = None,
                 *, key_required: bool = True) -> None:
        super().__init__(http, base_url, api_key, key_required=key_required)
        self.chat_url = URL(self.base_url + "/v1/chat/completions", encoded=True)  # parsed once
        self._headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        if self._headers is None:  # built once: the hot path only looks it up
            headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
            key = self.require_key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._headers = headers
        return self._headers

    async def chat(self, call: ChatCall) -> Response:
        return await self.http.forward(self.type, self.chat_url, call.body, self.headers(), call.stream)
