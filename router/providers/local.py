"""Local models served by Local Agents (`local_agent`), OpenAI-compatible.

A request goes to a live agent that announced the model (fewest in-flight
requests first); with none alive, to the registry endpoint or `LOCAL_AGENT_URL`.
JSON and SSE are relayed as they come, exactly like the OpenAI pass-through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response
from yarl import URL

from router.errors import RouterError
from router.providers.base import ApiProvider, ChatCall, normalize_base_url
from router.upstream import SSEResponse

if TYPE_CHECKING:
    from router.agents import AgentPool
    from router.upstream import UpstreamClient


class LocalProvider(ApiProvider):
    type = "local"
    url_var = "LOCAL_AGENT_URL"

    def __init__(self, http: UpstreamClient, fallback_url: str | None, pool: AgentPool | None = None) -> None:
        super().__init__(http, fallback_url or "", None, key_required=False)
        self.fallback_url = self.base_url or None
        self.pool = pool
        self._urls: dict[str, URL] = {}  # endpoint -> parsed chat URL, so no request rebuilds one

    def _chat_url(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = URL(normalize_base_url(endpoint) + "/v1/chat/completions", encoded=True)
        return url

    async def chat(self, call: ChatCall) -> Response:
        agent = self.pool.pick() if self.pool is not None else None
        if agent is None:
            if self.fallback_url is None:
                raise RouterError(500, f"no live agent serves '{call.model}' and LOCAL_AGENT_URL is not set",
                                  code="provider_not_configured")
            return await self.http.forward(self.type, self._chat_url(self.fallback_url), call.body,
                                           self.headers(), call.stream)

        url = self._chat_url(agent.endpoint)
        tracker = self.pool.tracker  # type: ignore[union-attr]
        tracker.begin(agent.name)
        try:
            response = await self.http.forward(self.type, url, call.body, self.headers(), call.stream)
        except BaseException:
            tracker.end(agent.name)
            raise
        if isinstance(response, SSEResponse):
            response.on_close.append(lambda: tracker.end(agent.name))
        else:
            tracker.end(agent.name)
        return response
