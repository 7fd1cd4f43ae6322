"""Agents known to this router process: their entries (from the registry) and last
heartbeats (in memory: the latest this process heard of, directly, through Redis
or from the registry; see `router.liveness`); which are alive (`AGENT_TTL`).
Choosing among them is the routing strategies' work: each agent is a deployment."""

from __future__ import annotations

import time
from collections.abc import Iterable

from router.registry import AgentEntry


class AgentDirectory:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.agents: dict[str, AgentEntry] = {}
        self.heartbeats: dict[str, float] = {}

    def replace(self, agents: Iterable[AgentEntry]) -> None:
        """Hold exactly `agents`; a heartbeat this process heard after the registry's stays."""
        known = self.heartbeats
        self.agents = {a.name: a for a in agents}
        self.heartbeats = {a.name: max(a.last_heartbeat, known.get(a.name, 0.0)) for a in self.agents.values()}

    def upsert(self, agent: AgentEntry) -> AgentEntry | None:
        """Store the agent; the entry it replaced, if any."""
        old = self.agents.get(agent.name)
        self.agents[agent.name] = agent
        self.heartbeats[agent.name] = max(agent.last_heartbeat, self.heartbeats.get(agent.name, 0.0))
        return old

    def remove(self, name: str) -> AgentEntry | None:
        self.heartbeats.pop(name, None)
        return self.agents.pop(name, None)

    def beat(self, name: str, now: float) -> None:
        if name in self.agents:
            self.heartbeats[name] = max(now, self.heartbeats.get(name, 0.0))

    def is_live(self, name: str, now: float | None = None) -> bool:
        hb = self.heartbeats.get(name)
        return hb is not None and (now if now is not None else time.time()) - hb <= self.ttl

    def live(self) -> list[AgentEntry]:
        now = time.time()
        return [a for a in self.agents.values() if self.is_live(a.name, now)]
