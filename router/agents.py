"""Agents known to this router process: their entries (from the registry), last
heartbeats (in memory: the latest this process heard of, directly, through Redis
or from the registry; see `router.liveness`), and in-flight request counts; which
are alive (`AGENT_TTL`); and, per model, the pool that picks the live agent with
the fewest requests in flight."""

from __future__ import annotations

import time
from collections.abc import Iterable

from router.registry import AgentEntry


class InFlight:
    """Requests in flight per agent, in this process."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def begin(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def end(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 1) - 1


class AgentDirectory:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.agents: dict[str, AgentEntry] = {}
        self.heartbeats: dict[str, float] = {}
        self.tracker = InFlight()

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
        if not self.tracker.counts.get(name):
            self.tracker.counts.pop(name, None)
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

    def models(self) -> dict[str, list[str]]:
        """Model name -> names of the agents that announced it (alive or not)."""
        out: dict[str, list[str]] = {}
        for agent in self.agents.values():
            for model in agent.models:
                out.setdefault(model, []).append(agent.name)
        return out


class AgentPool:
    """The agents serving one model; `pick` is O(agents for that model)."""

    def __init__(self, directory: AgentDirectory, names: list[str]) -> None:
        self.directory = directory
        self.names = names
        self.tracker = directory.tracker
        self._turn = 0  # rotates the starting agent so ties are shared round-robin

    def has_live(self) -> bool:
        now = time.time()
        return any(self.directory.is_live(n, now) for n in self.names)

    def pick(self, exclude: tuple[str, ...] = ()) -> AgentEntry | None:
        now = time.time()
        counts = self.tracker.counts
        best, best_load = None, 0
        names = self.names
        self._turn = start = (self._turn + 1) % len(names) if names else 0
        for i in range(len(names)):
            name = names[(start + i) % len(names)]
            if self.directory.is_live(name, now) and name not in exclude:
                load = counts.get(name, 0)
                if best is None or load < best_load:
                    best, best_load = name, load
        return self.directory.agents[best] if best is not None else None
