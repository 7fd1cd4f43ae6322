"""A model on a Local Agent (`local_agent`) or any OpenAI-compatible server of ours: one endpoint.

Each agent that announced a model is one `local` deployment of that model's group
(`router.routing.table`), so which agent serves a request is the group's strategy's choice, and an agent
that cannot be reached is skipped for the next deployment by the dispatcher, which answers 503
`no_live_agent` naming each one tried when no local deployment answers. JSON and SSE are relayed as they
come, exactly like the OpenAI pass-through. With `ROUTER_AGENT_TOKEN` set, it is sent to agents as a
bearer token (agents configured with it require it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from router.errors import RouterError
from router.providers.base import ChatCall
from router.providers.openai import OpenAICompatibleProvider

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.upstream import SSEResponse, UpstreamClient


class LocalProvider(OpenAICompatibleProvider):
    """The OpenAI-compatible pass-through, sending the agent token; no endpoint counts as not answering."""

    type = "local"
    url_var = "LOCAL_AGENT_URL"

    def __init__(self, http: UpstreamClient, endpoint: str | None, token: SecretStr | None = None) -> None:
        super().__init__(http, endpoint or "", token, key_required=False)

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        self._reachable()
        return await super().chat(call)

    async def embeddings(self, call: ChatCall) -> Response:
        self._reachable()
        return await super().embeddings(call)

    async def completions(self, call: ChatCall) -> Response | SSEResponse:
        self._reachable()
        return await super().completions(call)

    def _reachable(self) -> None:
        if not self.base_url:  # the `local` prefix rule without LOCAL_AGENT_URL: as if nothing answered
            raise RouterError(502, "LOCAL_AGENT_URL is not set", code="upstream_unreachable")
