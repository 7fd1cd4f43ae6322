"""Local models served by Local Agents (`local_agent`), OpenAI-compatible.

A request goes to a live agent that announced the model (fewest in-flight
requests first); an agent that cannot be reached, or that closes the connection
before answering, is skipped for the next one, and the registry endpoint or
`LOCAL_AGENT_URL` comes last. When none answers: 503 `no_live_agent` with
`Retry-After`, naming each one tried and why it failed. JSON and SSE are
relayed as they come, exactly like the OpenAI pass-through. With
`ROUTER_AGENT_TOKEN` set, it is sent to agents as a bearer token (agents
configured with it require it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response
from yarl import URL

from router.errors import RouterError
from router.providers.base import ApiProvider, ChatCall, normalize_base_url
from router.upstream import NOT_ANSWERED, SSEResponse

if TYPE_CHECKING:
    from pydantic import SecretStr

    from router.agents import AgentPool
    from router.registry import AgentEntry
    from router.upstream import UpstreamClient


class LocalProvider(ApiProvider):
    type = "local"
    url_var = "LOCAL_AGENT_URL"

    def __init__(self, http: UpstreamClient, fallback_url: str | None, pool: AgentPool | None = None,
                 token: SecretStr | None = None) -> None:
        super().__init__(http, fallback_url or "", token, key_required=False)
        self.fallback_url = self.base_url or None
        self.pool = pool
        self._urls: dict[str, URL] = {}  # endpoint -> parsed chat URL, so no request rebuilds one

    def _chat_url(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = URL(normalize_base_url(endpoint) + "/v1/chat/completions", encoded=True)
        return url

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        skipped: tuple[str, ...] = ()
        tried: list[str] = []  # what could not be reached, and why: the client is told
        while self.pool is not None and (agent := self.pool.pick(skipped)) is not None:
            try:
                return await self._send(self.pool, agent, call)
            except RouterError as exc:
                if exc.code not in NOT_ANSWERED:
                    raise
                skipped += (agent.name,)
                tried.append(f"agent {agent.name}: {exc.message}")
        if self.fallback_url is not None:  # the registry endpoint or LOCAL_AGENT_URL: the last one to try
            try:
                return await self.http.forward(self.type, self._chat_url(self.fallback_url), call.body,
                                               self.headers(), call.stream)
            except RouterError as exc:
                if exc.code not in NOT_ANSWERED:
                    raise
                tried.append(exc.message)
        elif not tried:  # e.g. its agent is restarting a worker, or its heartbeats lapsed
            tried.append("and LOCAL_AGENT_URL is not set")
        raise RouterError(503, f"No live agent serves '{call.model}' right now ({'; '.join(tried)}); retry shortly.",
                          code="no_live_agent", headers={"Retry-After": "5"})

    async def _send(self, pool: AgentPool, agent: AgentEntry, call: ChatCall) -> Response | SSEResponse:
        tracker = pool.tracker
        tracker.begin(agent.name)
        try:
            response = await self.http.forward(self.type, self._chat_url(agent.endpoint), call.body,
                                               self.headers(), call.stream)
        except BaseException:
            tracker.end(agent.name)
            raise
        if isinstance(response, SSEResponse):
            response.on_close.append(lambda: tracker.end(agent.name))
        else:
            tracker.end(agent.name)
        return response
