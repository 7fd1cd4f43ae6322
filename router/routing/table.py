"""Model name (or alias) -> `ModelGroup`, the deployments that serve it.

Built from the registry snapshot (`rebuild`): each group's deployments get their provider (per-deployment
key from `key_env`), prices and context window (explicit, else `router.prices.default_price`, else
unknown), their `DeploymentStats` (kept across rebuilds) and the group's strategy. Models announced by
agents become `agent-{name}` deployments of the group of that name (an implicit group when the registry has
none); an agent's (re-)registration or removal touches only the groups it joins or leaves
(`agent_changed`), and a heartbeat touches no route. Names found nowhere go through the design's prefix
rules to shared single-deployment groups (`{type}-default`). Every lookup is a dict hit plus a short fixed
list of prefixes: O(1) in the size of the registry.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from pydantic import SecretStr

from router.agents import AgentDirectory
from router.config import Settings
from router.errors import RouterError
from router.model_rename import ModelRename
from router.prices import default_price
from router.providers import build_provider
from router.providers.base import MisconfiguredProvider, Provider, normalize_base_url
from router.providers.dummy import DummyProvider
from router.providers.huggingface import HuggingFaceProvider
from router.providers.local import LocalProvider
from router.routing.deployment import DEFAULT_STRATEGY, LOCAL_TYPES, Deployment, ModelGroup
from router.routing.stats import StatsRegistry
from router.routing.strategies import build_strategy
from router.upstream import UpstreamClient, client_timeouts
from router.weights import WeightStore

if TYPE_CHECKING:
    from router.registry import DeploymentEntry, Snapshot

log = logging.getLogger("router.routing")

# prefix -> provider type, tried in order (the design's routing rules)
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("local", "local"),
    ("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
    ("text-embedding-", "openai"),
    ("llmd-", "llm-d"),
    ("claude", "anthropic"),
    ("google", "google"), ("gemini", "google"),
    ("openrouter", "openrouter"),
    ("grok", "grok"),
    ("venice", "venice"),
)

AGENT_PREFIX = "agent-"


class RouteTable:
    def __init__(self, settings: Settings, http: UpstreamClient, agents: AgentDirectory,
                 weights: WeightStore, stats: StatsRegistry | None = None) -> None:
        self.settings = settings
        self.http = http
        self.agents = agents
        self.weights = weights
        self.stats = stats if stats is not None else StatsRegistry()
        self.dummy = DummyProvider()
        self.groups: dict[str, ModelGroup] = {}  # registry groups, their aliases, and dummy
        self.agent_groups: dict[str, ModelGroup] = {}  # groups only agents serve (implicit)
        self.aliases: dict[str, str] = {}
        self._agent_providers: dict[str, LocalProvider] = {}  # agent name -> its provider (one per endpoint)
        self.prefixes: tuple[tuple[str, ModelGroup], ...] = ()
        self.rebuild(None)

    # -- building ------------------------------------------------------------------

    def _group(self, name: str, strategy: str | None = None, rpm: int | None = None,
               tpm: int | None = None) -> ModelGroup:
        try:
            chosen = build_strategy(strategy or DEFAULT_STRATEGY, self.settings)
        except ValueError as exc:  # the CLI refuses these; a hand-edited database must not stop routing
            log.error("model group %s: %s; using %s", name, exc, DEFAULT_STRATEGY)
            chosen = build_strategy(DEFAULT_STRATEGY, self.settings)
        return ModelGroup(name, [], chosen, rpm, tpm)

    def _deployment(self, group: str, id: str, type_: str, provider: Provider, upstream: str | None = None,
                    **fields: object) -> Deployment:
        upstream = upstream or group
        local = type_ in LOCAL_TYPES
        if fields.get("max_parallel") is None:
            fields["max_parallel"] = 1 if local else math.inf  # unknown: a local server queues, a hosted API not
        s = self.settings
        timeout, connect, idle = (fields.get("timeout"), fields.pop("connect_timeout", None),
                                  fields.pop("idle_timeout", None))
        fields["request_timeout"], fields["stream_timeout"] = client_timeouts(
            float(timeout or s.upstream_timeout), float(connect or s.upstream_connect_timeout),  # type: ignore[arg-type]
            float(idle or s.upstream_idle_timeout))  # type: ignore[arg-type]
        return Deployment(id=id, group=group, type=type_, provider=provider, upstream_model=upstream,
                          rename=ModelRename(group, upstream) if upstream != group else None,
                          stats=self.stats.get(f"{group}\x00{id}"), local=local,
                          **fields)  # type: ignore[arg-type]

    def _prefix_group(self, type_: str) -> ModelGroup | None:
        """The shared group a prefix rule routes to: one deployment on the type's default endpoint."""
        s = self.settings
        if type_ == "llm-d" and not s.llmd_endpoint:
            return None
        provider: Provider = (LocalProvider(self.http, s.local_agent_url, token=s.router_agent_token)
                              if type_ == "local" else build_provider(type_, self.http, None, s))
        id_ = f"{type_}-default"
        timeouts = client_timeouts(s.upstream_timeout, s.upstream_connect_timeout, s.upstream_idle_timeout)
        # no name (the public name is whatever the client asked: `group.name or call.model`), no rename (the
        # upstream gets the name as sent), one deployment shared by every name the prefix matches
        group = ModelGroup("", [], build_strategy(DEFAULT_STRATEGY, s))
        group.deployments.append(Deployment(id=id_, group="", type=type_, provider=provider, upstream_model="",
                                            rename=None, stats=self.stats.get(f"\x00{id_}"),
                                            local=type_ in LOCAL_TYPES,
                                            max_parallel=1 if type_ in LOCAL_TYPES else math.inf,
                                            request_timeout=timeouts[0], stream_timeout=timeouts[1]))
        return group

    def _provider(self, entry: DeploymentEntry) -> Provider:
        if entry.type == "dummy":
            return self.dummy
        if entry.type == "local":
            return LocalProvider(self.http, entry.endpoint or None, token=self.settings.router_agent_token)
        if entry.type == HuggingFaceProvider.type:
            return HuggingFaceProvider(self.weights, entry.endpoint)
        key: SecretStr | None = None
        if entry.key_env:
            value = os.environ.get(entry.key_env)
            if not value:
                return MisconfiguredProvider(entry.type, f"set {entry.key_env} (the key of deployment "
                                                         f"{entry.name})")
            key = SecretStr(value)
        return build_provider(entry.type, self.http, entry.endpoint, self.settings, entry.max_tokens_param, key)

    def _registry_deployment(self, entry: DeploymentEntry) -> Deployment:
        upstream = entry.upstream_model or entry.group
        input_price, output_price, window = entry.input_price, entry.output_price, entry.context_window
        if input_price is None or output_price is None or window is None:
            known = default_price(entry.type, upstream)
            if known is not None:
                input_price = known.input if input_price is None else input_price
                output_price = known.output if output_price is None else output_price
                window = known.context_window if window is None else window
        return self._deployment(
            entry.group, entry.name, entry.type, self._provider(entry), upstream, input_price=input_price,
            output_price=output_price, context_window=window, weight=entry.weight, rpm=entry.rpm, tpm=entry.tpm,
            timeout=entry.timeout, enabled=entry.enabled, max_parallel=entry.max_parallel,
            connect_timeout=entry.connect_timeout, idle_timeout=entry.idle_timeout,
            first_token_timeout=entry.first_token_timeout)

    def rebuild(self, snapshot: Snapshot | None) -> None:
        """Rebuild every group from a registry snapshot (None: none yet) and the agent directory."""
        groups: dict[str, ModelGroup] = {}
        aliases: dict[str, str] = {}
        if snapshot is not None:
            for g in snapshot.groups:
                made = groups[g.name] = self._group(g.name, g.strategy, g.rpm, g.tpm)
                made.fallbacks, made.content_policy_fallbacks = g.fallbacks, g.content_policy_fallbacks
            for entry in snapshot.deployments:
                group = groups.get(entry.group)
                if group is None:  # a deployment without its group row: never expected, never fatal
                    group = groups[entry.group] = self._group(entry.group)
                group.deployments.append(self._registry_deployment(entry))
            aliases = dict(snapshot.aliases)
        if "dummy" not in groups:
            dummy = groups["dummy"] = self._group("dummy")
            dummy.deployments.append(self._deployment("dummy", "dummy", "dummy", self.dummy))
        self._agent_providers = {}
        agent_groups: dict[str, ModelGroup] = {}
        for name, agent in self.agents.agents.items():
            for model in agent.models:
                group = groups.get(model) or agent_groups.get(model)
                if group is None:
                    group = agent_groups[model] = self._group(model)
                group.deployments.append(self._agent_deployment(name, model))
        self.prefixes = tuple((prefix, group) for prefix, type_ in PREFIX_RULES
                              if (group := self._prefix_group(type_)) is not None)
        for alias, target in aliases.items():
            if alias not in groups and target in groups:
                groups[alias] = groups[target]
        self.groups, self.agent_groups, self.aliases = groups, agent_groups, aliases
        log.debug("route table: %d groups, %d agent groups", len(groups), len(agent_groups))

    def _agent_deployment(self, agent: str, model: str) -> Deployment:
        provider = self._agent_providers.get(agent)
        entry = self.agents.agents[agent]
        if provider is None:
            provider = self._agent_providers[agent] = LocalProvider(self.http, entry.endpoint,
                                                                     token=self.settings.router_agent_token)
        directory = self.agents
        return self._deployment(model, AGENT_PREFIX + agent, "local", provider,
                                live=lambda: directory.is_live(agent))

    # -- agents --------------------------------------------------------------------------

    def agent_changed(self, name: str, old_models: tuple[str, ...], new_models: tuple[str, ...]) -> None:
        """Agent `name` now announces `new_models` instead of `old_models` (empty: it is gone).

        Only the groups it left or joined change (each gets a new deployment list, so a request choosing
        in one keeps its own): O(those groups' deployments)."""
        id_ = AGENT_PREFIX + name
        entry = self.agents.agents.get(name)
        provider = self._agent_providers.get(name)
        moved = provider is not None and (entry is None or provider.base_url != normalize_base_url(entry.endpoint))
        if moved:
            del self._agent_providers[name]
        new = set(new_models) if entry is not None else set()
        for model in old_models:
            kept = model in new
            if kept and not moved:
                continue  # still announced, same endpoint: nothing to change
            group = self.groups.get(model) or self.agent_groups.get(model)
            if group is None:
                continue
            group.deployments = [self._agent_deployment(name, model) if d.id == id_ else d
                                 for d in group.deployments if kept or d.id != id_]
            if not group.deployments and model in self.agent_groups:
                del self.agent_groups[model]
        for model in new:
            if model in old_models:
                continue
            group = self.groups.get(model) or self.agent_groups.get(model)
            if group is None:
                group = self.agent_groups[model] = self._group(model)
            group.deployments = [*(d for d in group.deployments if d.id != id_), self._agent_deployment(name, model)]

    # -- lookups ---------------------------------------------------------------------------

    def resolve(self, model: str) -> ModelGroup:
        """The group serving `model`: the registry (and aliases), then agents' models while one is live, then
        the prefix rules; 404 otherwise."""
        group = self.groups.get(model)
        if group is not None:
            return group
        group = self.agent_groups.get(model)
        if group is not None and any(d.healthy() for d in group.deployments):
            return group
        for prefix, shared in self.prefixes:
            if model.startswith(prefix):
                return shared
        raise RouterError(404, f"The model '{model}' does not exist or you do not have access to it.",
                          code="model_not_found", param="model")

    def local_groups(self) -> list[str]:
        """Names of the registry groups with a `local` deployment (agents may always announce those)."""
        return [name for name, g in self.groups.items() if any(d.type == "local" and d.live is None
                                                                for d in g.deployments)]
