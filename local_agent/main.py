"""The Local Agent's ASGI app: `uvicorn local_agent.main:app --port 5000`.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/embeddings` (forwarded
by `model` to a healthy worker, fewest in-flight first; JSON relayed whole and
SSE chunk by chunk through the router's own `UpstreamClient`), `GET /v1/models`
(the models this agent can serve now), `GET /workers` (each worker's state),
`GET /health`. A worker with `upstream_model` gets that name in the request and
clients get theirs back in every answer (`router.model_rename`); a router's
hop header goes on to the worker, so a worker that is a router sees a loop.
The lifespan starts the workers and the announcer; on SIGTERM uvicorn stops
accepting, lets in-flight requests finish, and only then are the workers
stopped.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from local_agent.config import AgentSettings, load_agent_settings
from local_agent.registration import Announcer
from local_agent.workers import Supervisor, Worker
from router import hops, upstream
from router.api.body import parse_object, read_body
from router.config import ConfigError
from router.errors import RouterError, Scrubber, http_error_response, router_error_response
from router.observability import console_handler
from router.upstream import NOT_ANSWERED, SSEResponse, UpstreamClient

log = logging.getLogger("local_agent")
FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_HOP_HEADER = hops.HOP_HEADER.encode()


class Agent:
    """Everything the agent process holds."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.announcer = Announcer(settings, lambda: self.supervisor.healthy_models())
        self.supervisor = Supervisor(settings, self.announcer.notify)
        secrets = [settings.router_token.get_secret_value()] if settings.router_token else []
        self.http = UpstreamClient(Scrubber(secrets), timeout=settings.request_timeout,
                                   connect_timeout=settings.connect_timeout, max_connections=1000)
        self.token = settings.router_token.get_secret_value().encode() if settings.router_token else None
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}

    async def start(self) -> None:
        await self.http.start()
        await self.supervisor.start()
        await self.announcer.start()

    async def stop(self) -> None:
        await self.announcer.stop()
        await self.supervisor.stop()
        await self.http.close()

    def authorize(self, scope: Scope) -> None:
        if self.token is None:
            return
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
                    return
                break
        raise RouterError(401, "This agent requires 'Authorization: Bearer <router agent token>'.",
                          code="invalid_api_key")

    # -- forwarding ----------------------------------------------------------------

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self.authorize(scope)
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            hops.outgoing.set(_received_hops(scope))  # a worker that is a router sees the chain and can refuse a loop
            for name, value in scope["headers"]:  # the router's request id and trace go on to the worker
                if name == b"x-client-request-id" and len(value) <= 200:
                    upstream.outgoing_request_id.set(value.decode("latin-1"))
                elif name == b"traceparent" and len(value) <= 128:
                    upstream.outgoing_traceparent.set(value.decode("latin-1"))
            response = await self._forward(scope["path"], body)
        except RouterError as exc:
            response = exc.response()
        except Exception:
            log.exception("unhandled error forwarding %s", scope["path"])
            response = RouterError(500, "The agent had an error while processing your request.",
                                   code="internal_error").response()
        await response(scope, receive, send)

    async def _forward(self, path: str, body: bytes) -> Response | SSEResponse:
        model, stream, _ = parse_request(body)
        tried: tuple[Worker, ...] = ()
        while True:
            worker = self.supervisor.pick(model, tried)
            if worker is None:
                raise self._unavailable(model, tried)
            rename = worker.rename  # the worker knows the model by another name: clients never see it
            try:
                response = await self._send(worker, path, body if rename is None else rename.request(body), stream)
            except RouterError as exc:
                if exc.code not in NOT_ANSWERED:  # the worker answered nothing: another may take it
                    raise
                self.supervisor.suspect(worker, exc.message)
                tried += (worker,)
                continue
            return response if rename is None else rename.response(response)

    async def _send(self, worker: Worker, path: str, body: bytes, stream: bool) -> Response | SSEResponse:
        worker.in_flight += 1
        worker.requests += 1
        try:
            response = await self.http.forward(f"worker {worker.spec.model}", worker.urls[path], body,
                                               self.headers, stream, "data" if path == "/v1/embeddings" else "choices")
        except BaseException:
            worker.done()
            raise
        if isinstance(response, SSEResponse):
            response.on_close.append(worker.done)
        else:
            worker.done()
        return response

    def _unavailable(self, model: str, tried: tuple[Worker, ...]) -> RouterError:
        workers = self.supervisor.by_model.get(model)
        if not workers:
            return RouterError(404, f"The model '{model}' is not served by this agent.", param="model",
                               code="model_not_found")
        if tried:
            return RouterError(502, f"no worker of '{model}' could be reached: {tried[-1].last_error}",
                               code="upstream_unreachable")
        states = ", ".join(sorted({w.state for w in workers}))
        return RouterError(503, f"The model '{model}' has no healthy worker right now ({states}); retry shortly.",
                           code="model_not_ready", headers={"Retry-After": "5"})

    # -- other endpoints -------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self.authorize(request.scope)
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": self.settings.name}
                for m in self.supervisor.healthy_models()]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def workers(self, request: Request) -> Response:
        self.authorize(request.scope)  # commands and errors may carry what only operators should see
        return Response(orjson.dumps({
            "agent": self.settings.name,
            "endpoint": self.settings.endpoint,
            "healthy_models": self.supervisor.healthy_models(),
            "router": self.announcer.status(),
            "workers": [w.snapshot() for w in self.supervisor.workers],
        }), media_type="application/json")

    async def health(self, request: Request) -> Response:
        models = self.supervisor.healthy_models()
        return Response(orjson.dumps({"status": "ok", "healthy_models": models}), media_type="application/json")


def _received_hops(scope: Scope) -> str | None:
    """The routers this request passed through (`x-llm-router-hops`), passed on to the worker unchanged."""
    received = [value.decode("latin-1") for name, value in scope["headers"] if name == _HOP_HEADER]
    return ",".join(received) if received else None


def parse_request(body: bytes) -> tuple[str, bool, dict[str, Any]]:
    """The `model` and `stream` fields; the payload itself is forwarded as the client sent it."""
    payload = parse_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RouterError(400, "you must provide a model parameter", param="model",
                          code="missing_required_parameter")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RouterError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    return model, bool(stream), payload


async def _method_not_allowed(request: Request) -> Response:
    raise RouterError(405, "Method Not Allowed")


def create_app(settings: AgentSettings | None = None) -> AgentApp:
    settings = settings or load_agent_settings()
    logging.basicConfig(level=settings.log_level,
                        handlers=[console_handler("%(asctime)s %(levelname)s %(name)s: %(message)s")])
    agent = Agent(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await agent.start()
        log.info("agent %s ready: %d workers, announcing to %s", settings.name, len(settings.workers),
                 settings.router_url or "nobody")
        try:
            yield
        finally:
            log.info("agent %s stopping: in-flight requests are done; stopping workers", settings.name)
            await agent.stop()

    app = Starlette(
        routes=[
            *(Route(path, _method_not_allowed, methods=["POST"]) for path in FORWARDED),
            Route("/v1/models", agent.list_models, methods=["GET"]),
            Route("/workers", agent.workers, methods=["GET"]),
            Route("/health", agent.health, methods=["GET"]),
        ],
        exception_handlers={RouterError: router_error_response, HTTPException: http_error_response},
        lifespan=lifespan,
    )
    app.state.agent = agent
    return AgentApp(app, agent)


class AgentApp:
    """POSTs to the forwarded paths go straight to the agent; the rest through Starlette."""

    def __init__(self, app: Starlette, agent: Agent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in FORWARDED:
            await self.agent.forward(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _LazyApp:
    """`local_agent.main:app`, built on first use so importing this module reads no config."""

    _app: AgentApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            try:
                type(self)._app = create_app()
            except ConfigError as exc:
                if scope["type"] != "lifespan":
                    raise
                await receive()  # lifespan.startup: refuse it with one line instead of a traceback
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
        await self._app(scope, receive, send)  # type: ignore[misc]


app = _LazyApp()
