"""Model name -> provider instance.

Order: the registry (its `type` picks the provider class, its `endpoint` the
base URL), then models announced by live agents, then the prefix rules of the
design. Every lookup is a dict hit plus a short fixed list of prefixes: O(1) in
the size of the registry. `rebuild` runs when the registry's models change;
an agent's (re-)registration or removal only touches the pools of the models it
announced or dropped (`agent_changed`), and a heartbeat touches no route.
"""

from __future__ import annotations

from router.agents import AgentDirectory, AgentPool
from router.config import Settings
from router.errors import RouterError
from router.providers import build_provider
from router.providers.base import Provider
from router.providers.dummy import DummyProvider
from router.providers.huggingface import HuggingFaceProvider
from router.providers.local import LocalProvider
from router.registry import ModelEntry
from router.upstream import UpstreamClient
from router.weights import WeightStore

# prefix -> provider type, tried in order (the design's routing rules)
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("local", "local"),
    ("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
    ("llmd-", "llm-d"),
    ("claude", "anthropic"),
    ("google", "google"), ("gemini", "google"),
    ("openrouter", "openrouter"),
    ("grok", "grok"),
    ("venice", "venice"),
)


class RouteTable:
    def __init__(self, settings: Settings, http: UpstreamClient, agents: AgentDirectory,
                 weights: WeightStore) -> None:
        self.settings = settings
        self.http = http
        self.agents = agents
        self.weights = weights
        self.dummy = DummyProvider()
        self.models: dict[str, Provider] = {"dummy": self.dummy}
        self.agent_models: dict[str, LocalProvider] = {}
        self.pools: dict[str, AgentPool] = {}  # model -> the agents that announced it (alive or not)
        self.prefixes: tuple[tuple[str, Provider], ...] = tuple(
            (prefix, provider)
            for prefix, type_ in PREFIX_RULES
            if (provider := self._default_provider(type_)) is not None
        )

    def _default_provider(self, type_: str) -> Provider | None:
        """The provider a prefix rule routes to, on the configured default endpoint."""
        s = self.settings
        if type_ == "local":
            return LocalProvider(self.http, s.local_agent_url, token=s.router_agent_token)
        if type_ == "llm-d" and not s.llmd_endpoint:
            return None
        return build_provider(type_, self.http, None, s)

    def rebuild(self, models: list[ModelEntry]) -> None:
        """Rebuild the lookup tables from a registry snapshot and the agent directory."""
        pools = {name: AgentPool(self.agents, agent_names) for name, agent_names in self.agents.models().items()}
        table: dict[str, Provider] = {}
        for entry in models:
            if entry.type == "dummy":
                table[entry.name] = self.dummy
            elif entry.type == "local":  # always with a pool (maybe empty), so agents can join it later
                pool = pools.setdefault(entry.name, AgentPool(self.agents, []))
                table[entry.name] = LocalProvider(self.http, entry.endpoint, pool,
                                                  token=self.settings.router_agent_token)
            elif entry.type == HuggingFaceProvider.type:
                table[entry.name] = HuggingFaceProvider(self.weights, entry.endpoint)
            else:
                table[entry.name] = build_provider(entry.type, self.http, entry.endpoint, self.settings,
                                                   entry.max_tokens_param)
        table.setdefault("dummy", self.dummy)
        self.models = table
        self.pools = pools
        self.agent_models = {name: self._agent_provider(pool) for name, pool in pools.items() if name not in table}

    def _agent_provider(self, pool: AgentPool) -> LocalProvider:
        return LocalProvider(self.http, None, pool, token=self.settings.router_agent_token)

    def agent_changed(self, name: str, old_models: tuple[str, ...], new_models: tuple[str, ...]) -> None:
        """Agent `name` now announces `new_models` instead of `old_models` (empty: it is gone).

        Only the pools of the models it dropped or added change: O(those models x their agents)."""
        new = set(new_models)
        for model in set(old_models) - new:
            pool = self.pools.get(model)
            if pool is None:
                continue
            pool.names = [n for n in pool.names if n != name]  # a new list: a pick in progress keeps its own
            if not pool.names and model not in self.models:
                del self.pools[model]
                self.agent_models.pop(model, None)
        for model in new_models:
            if model in old_models:
                continue
            pool = self.pools.get(model)
            if pool is None:
                pool = self.pools[model] = AgentPool(self.agents, [name])
                if model not in self.models:
                    self.agent_models[model] = self._agent_provider(pool)
            elif name not in pool.names:
                pool.names = [*pool.names, name]

    def resolve(self, model: str) -> Provider:
        provider = self.models.get(model)
        if provider is not None:
            return provider
        local = self.agent_models.get(model)
        if local is not None and local.pool is not None and local.pool.has_live():
            return local
        for prefix, provider in self.prefixes:
            if model.startswith(prefix):
                return provider
        raise RouterError(404, f"The model '{model}' does not exist or you do not have access to it.",
                          code="model_not_found", param="model")
