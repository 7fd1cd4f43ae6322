"""Announcing this agent to the router: `POST /register` with the models of
the healthy workers, then `POST /heartbeat` every `heartbeat_interval`.

It registers again when the router answers 404 (it forgot us), after any
failed contact (the router may have restarted), and at once whenever the set
of healthy models changes. While the router is down it retries with backoff
(1 s doubling to 30 s) and never gives up or crashes. On shutdown it announces
an empty model list, so the router stops routing here before the TTL lapses.

Idle connections to the router are kept `KEEPALIVE` seconds, below uvicorn's
5 s, and a request whose connection was closed under it before any answer (the
server dropped it as idle just as the request went out) is sent again at once
on a new connection: registering and heartbeating are idempotent, and such a
race is neither a failed contact nor a reason to register again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from local_agent.config import AgentSettings

log = logging.getLogger("local_agent.registration")
RETRY_MAX = 30.0
CONTACT_TIMEOUT = 5.0
#: seconds an idle connection to the router is kept: below uvicorn's (and Node's) 5 s keep-alive
KEEPALIVE = 2.0


class Announcer:
    def __init__(self, settings: AgentSettings, models: Callable[[], list[str]]) -> None:
        self.settings = settings
        self.models = models
        self.changed = asyncio.Event()
        self.registered: list[str] | None = None  # models the router has, as far as we know
        self.last_contact: float | None = None
        self.last_error: str | None = None
        self.registrations = 0
        self.heartbeats = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        base = (settings.router_url or "").rstrip("/")
        self._urls = {"register": base + "/register", "heartbeat": base + "/heartbeat"}
        headers = {"Content-Type": "application/json"}
        if settings.router_token is not None:
            headers["Authorization"] = "Bearer " + settings.router_token.get_secret_value()
        self._headers = headers

    def notify(self) -> None:
        """The healthy set changed: re-register now."""
        self.changed.set()

    async def start(self) -> None:
        if not self.settings.router_url:
            log.info("no AGENT_ROUTER_URL: running standalone, not announcing")
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONTACT_TIMEOUT),
                                              connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE))
        self._task = asyncio.create_task(self._run(), name="announcer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            if self.registered:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    await self._post("register", self._registration([]))
                    log.info("told the router this agent serves no models any more")
            await self._session.close()

    def status(self) -> dict[str, Any]:
        return {"router_url": self.settings.router_url, "registered_models": self.registered,
                "last_contact": self.last_contact, "last_error": self.last_error,
                "registrations": self.registrations, "heartbeats": self.heartbeats}

    # -- the loop ------------------------------------------------------------------

    def _registration(self, models: list[str]) -> dict[str, Any]:
        return {"name": self.settings.name, "endpoint": self.settings.endpoint, "models": models}

    async def _post(self, what: str, payload: dict[str, Any]) -> int:
        try:
            return await self._send(what, payload)
        except aiohttp.ClientConnectionError as exc:
            if not _closed_before_answer(exc):
                raise
            log.debug("the router closed the connection under the %s; sending it again", what)
            return await self._send(what, payload)  # the broken connection is gone: this one is new

    async def _send(self, what: str, payload: dict[str, Any]) -> int:
        assert self._session is not None
        async with self._session.post(self._urls[what], data=orjson.dumps(payload), headers=self._headers) as resp:
            body = await resp.read()
            if resp.status >= 400 and resp.status != 404:
                raise RouterRefused(resp.status, body)
            return resp.status

    async def _run(self) -> None:
        retry = 1.0
        while True:
            self.changed.clear()
            models = self.models()
            try:
                if self.registered != models:
                    await self._post("register", self._registration(models))
                    self.registered = models
                    self.registrations += 1
                    log.info("registered with %s as %s: %s", self.settings.router_url, self.settings.name,
                             ", ".join(models) or "(no healthy models yet)")
                elif await self._post("heartbeat", {"name": self.settings.name}) == 404:
                    log.info("router does not know this agent (restarted or expired): registering again")
                    self.registered = None
                    continue
                else:
                    self.heartbeats += 1
                if self.last_error is not None:
                    log.info("router reachable again")
                self.last_contact, self.last_error, retry = time.time(), None, 1.0
            except (TimeoutError, aiohttp.ClientError, OSError, RouterRefused) as exc:
                message = str(exc) if isinstance(exc, RouterRefused) else f"{exc.__class__.__name__}: {exc}"
                if self.last_error is None:
                    log.warning("announcing to %s failed (%s); retrying with backoff", self.settings.router_url,
                                message)
                self.last_error = message
                self.registered = None  # it may have restarted: register again once it answers
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.settings.heartbeat_interval)


def _closed_before_answer(exc: aiohttp.ClientConnectionError) -> bool:
    """The connection was closed or reset under the request (not a refused connect, not a timeout)."""
    return not isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError)) and isinstance(
        exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError))


class RouterRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        try:
            message = orjson.loads(body)["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = body[:200].decode("utf-8", "replace")
        super().__init__(f"router answered {status}: {message}")
        self.status = status
