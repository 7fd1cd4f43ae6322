"""The registry's data model, independent of the database: entries (groups, deployments, aliases, agents,
keys, agent tokens), the `Snapshot` the router serves from, and the validation every write goes through."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MODEL_TYPES = (
    "local", "openai", "llm-d", "anthropic", "google", "openrouter",
    "grok", "groq", "venice", "huggingface", "dummy",
)
MODEL_KINDS = ("api", "weight")
# What KIND means: `api`, the model is reached through a provider's hosted API (their hardware, billed per
# token); `weight`, its weights run on hardware you operate (a Local Agent, an llm-d cluster, this process).
# Hosted API types are always `api`, `huggingface` always `weight`; `local`, `llm-d` and `dummy` take either.
HOSTED_TYPES = frozenset({"openai", "anthropic", "google", "openrouter", "grok", "groq", "venice"})
DEFAULT_KIND = {**dict.fromkeys(HOSTED_TYPES, "api"), "huggingface": "weight", "local": "weight", "llm-d": "weight",
                "dummy": "api"}
MAX_TOKENS_PARAMS = ("max_tokens", "max_completion_tokens")
# the strategy names when router.routing.strategies is not importable (it owns the list)
_FALLBACK_STRATEGIES = ("cost-latency", "weighted", "least-busy", "latency", "cost", "round-robin", "random")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")  # deployment names: safe in headers and labels
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_deployment_name(type: str, endpoint: str, taken: Iterable[str] = ()) -> str:
    """`{type}-{host}`, with `-2`, `-3`... appended while the name is in `taken`."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", urlsplit(endpoint).hostname or "") or "default"
    base, used = f"{type}-{host}"[:90], set(taken)
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    return name



KEY_PREFIX = "sk-router-"
AGENT_TOKEN_PREFIX = "sk-agent-"
# credential names the router binds agents to besides agent tokens' own names: ROUTER_AGENT_TOKEN, the
# master key, and open registration from loopback when no credential is configured
RESERVED_TOKEN_NAMES = ("shared", "master", "loopback")


class RegistryError(ValueError):
    """Invalid input for the registry; the message is one line for the user."""


class AgentNameTaken(RegistryError):
    """The agent name is bound to another credential."""


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    key_hash: str
    key_prefix: str
    rpm: int | None
    tpm: int | None
    models: frozenset[str] | None  # None: every model
    expires_at: float | None
    created_at: float
    revoked_at: float | None
    budget: float | None = None  # USD per budget period; None: no budget
    budget_period: float | None = None  # seconds; None: the key's whole life
    budget_start: float | None = None  # Unix time the periods count from
    log_content: bool | None = None  # store prompts and answers in the request log; None: REQUEST_LOG_CONTENT


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AgentToken:
    name: str
    token_hash: str
    token_prefix: str
    models: frozenset[str] | None  # hosted-provider names its agents may announce besides the usual ones
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class AgentEntry:
    name: str
    endpoint: str
    models: tuple[str, ...]
    registered_at: float
    last_heartbeat: float
    token_name: str | None = None  # the credential that registered it (None: registered before tokens)


@dataclass(frozen=True, slots=True)
class GroupEntry:
    """A model group: the public name, its strategy (None: the default) and its limits across all clients."""

    name: str
    strategy: str | None
    rpm: int | None
    tpm: int | None
    created_at: float
    updated_at: float
    fallbacks: tuple[str, ...] = ()  # groups (or aliases) tried in order once its own deployments are exhausted
    content_policy_fallbacks: bool = False  # a content-policy refusal goes to the fallbacks too


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    """One deployment of a group as stored. `upstream_model` None: the group's name; prices in USD per
    million tokens, None: not set here (a default may come from router.prices); `key_env` names the
    environment variable holding its key (the key is never stored)."""

    id: int
    group: str
    name: str
    type: str
    endpoint: str
    kind: str
    upstream_model: str | None
    key_env: str | None
    input_price: float | None
    output_price: float | None
    context_window: int | None
    weight: float
    rpm: int | None
    tpm: int | None
    timeout: float | None
    enabled: bool
    max_tokens_param: str | None
    created_at: float
    updated_at: float
    max_parallel: int | None = None  # requests served at once before queueing; None: by type (routing/table.py)
    # seconds (None: the UPSTREAM_* setting): to connect, to a stream's first content, between stream chunks
    connect_timeout: float | None = None
    first_token_timeout: float | None = None
    idle_timeout: float | None = None

    def values(self) -> dict[str, Any]:
        """The editable fields (DEPLOYMENT_FIELDS) as a dict."""
        return {f: getattr(self, f) for f in DEPLOYMENT_FIELDS}


#: a deployment's editable fields, in file and table order
DEPLOYMENT_FIELDS = ("name", "type", "endpoint", "kind", "upstream_model", "key_env", "input_price",
                     "output_price", "context_window", "weight", "rpm", "tpm", "timeout", "enabled",
                     "max_tokens_param", "max_parallel", "connect_timeout", "first_token_timeout", "idle_timeout")
DEPLOYMENT_DEFAULTS: dict[str, Any] = {"name": None, "kind": None, "upstream_model": None, "key_env": None,
                                       "input_price": None,
                                       "output_price": None, "context_window": None, "weight": 1.0, "rpm": None,
                                       "tpm": None, "timeout": None, "enabled": True, "max_tokens_param": None,
                                       "max_parallel": None, "connect_timeout": None,
                                       "first_token_timeout": None, "idle_timeout": None}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the router reads from the registry, loaded in one read transaction."""

    groups: list[GroupEntry] = field(default_factory=list)
    deployments: list[DeploymentEntry] = field(default_factory=list)  # ordered by group, then id
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> group name
    agents: list[AgentEntry] = field(default_factory=list)
    keys: list[ClientKey] = field(default_factory=list)
    agent_tokens: list[AgentToken] = field(default_factory=list)

    def by_group(self) -> tuple[dict[str, list[str]], dict[str, list[DeploymentEntry]]]:
        """Aliases and deployments, each listed under its model group's name."""
        aliases: dict[str, list[str]] = {}
        for alias, group in self.aliases.items():
            aliases.setdefault(group, []).append(alias)
        deployments: dict[str, list[DeploymentEntry]] = {}
        for d in self.deployments:
            deployments.setdefault(d.group, []).append(d)
        return aliases, deployments


def strategy_names() -> tuple[str, ...]:
    try:  # imported lazily: the registry must not pull in the routing package
        strategies = importlib.import_module("router.routing.strategies")
    except ImportError:
        return _FALLBACK_STRATEGIES
    return tuple(getattr(strategies, "STRATEGIES", _FALLBACK_STRATEGIES))


def validate_strategy(name: object) -> str | None:
    if name is None:
        return None
    names = strategy_names()
    if name not in names:
        raise RegistryError(f"unknown strategy {name!r}; valid strategies: {', '.join(names)}")
    return str(name)


def validate_group_name(name: object, what: str = "model name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{what} must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 256:
        raise RegistryError(f"{what} must be at most 256 printable characters")
    return name.strip()


def _number(value: Any, what: str, integer: bool = False, minimum: float = 0.0,
            strict: bool = False) -> Any:
    """None, or a number >= minimum (> minimum when strict); one-line RegistryError otherwise."""
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value != value or value in (float("inf"), float("-inf")):
        raise RegistryError(f"{what} must be a{'n integer' if integer else ' number'}, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise RegistryError(f"{what} must be {'more than' if strict else 'at least'} {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def validate_deployment(group: str, values: Mapping[str, Any], check_env: bool = True) -> dict[str, Any]:
    """All of DEPLOYMENT_FIELDS, checked and normalised (kind inferred from the type when None;
    upstream_model equal to the group stored as None; a 0 limit means none)."""
    v = {**DEPLOYMENT_DEFAULTS, **values}
    unknown = set(v) - set(DEPLOYMENT_FIELDS)
    if unknown:
        raise RegistryError(f"unknown deployment field(s): {', '.join(sorted(unknown))}")
    missing = [f for f in ("type", "endpoint") if f not in v]
    if missing:
        raise RegistryError(f"a deployment needs {' and '.join(missing)}")
    type = v["type"]
    if type not in MODEL_TYPES:
        raise RegistryError(f"unknown type {type!r}; valid types: {', '.join(MODEL_TYPES)}")
    kind = v["kind"] if v["kind"] is not None else DEFAULT_KIND[type]
    if kind not in MODEL_KINDS:
        raise RegistryError(f"kind must be 'api' or 'weight', got {kind!r}")
    if (type in HOSTED_TYPES and kind != "api") or (type == "huggingface" and kind != "weight"):
        raise RegistryError(f"kind {kind!r} contradicts type {type!r}: {type} deployments are "
                            f"{'api' if type in HOSTED_TYPES else 'weight'} (api: a hosted API; weight: weights "
                            "you run)")
    out: dict[str, Any] = {"type": type, "kind": kind, "endpoint": validate_url(v["endpoint"])}
    name = v["name"] if v["name"] is not None else default_deployment_name(type, out["endpoint"])
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(f"deployment name must be 1-100 letters, digits, '.', '_', ':' or '-' (starting with "
                            f"a letter or digit), got {name!r}")
    out["name"] = name
    upstream = v["upstream_model"]
    if upstream is not None and (not isinstance(upstream, str) or not upstream.strip()):
        raise RegistryError(f"upstream model must be a non-empty name, got {upstream!r}")
    out["upstream_model"] = None if upstream is None or upstream.strip() == group else upstream.strip()
    key_env = v["key_env"]
    if key_env is not None:
        if not isinstance(key_env, str) or not _ENV_RE.match(key_env):
            raise RegistryError(f"key_env must be an environment variable name, got {key_env!r}")
        if check_env and not os.environ.get(key_env):
            raise RegistryError(f"environment variable {key_env} (key_env) is not set; set it to the "
                                "deployment's key first (only its name is stored)")
    out["key_env"] = key_env
    out["input_price"] = _number(v["input_price"], "input price")
    out["output_price"] = _number(v["output_price"], "output price")
    out["context_window"] = _number(v["context_window"], "context window", integer=True, minimum=1)
    weight = _number(v["weight"], "weight")
    out["weight"] = 1.0 if weight is None else weight
    out["rpm"] = _number(v["rpm"], "rpm", integer=True) or None
    out["tpm"] = _number(v["tpm"], "tpm", integer=True) or None
    out["timeout"] = _number(v["timeout"], "timeout", strict=True)
    if not isinstance(v["enabled"], bool):
        raise RegistryError(f"enabled must be true or false, got {v['enabled']!r}")
    out["enabled"] = v["enabled"]
    if v["max_tokens_param"] not in (None, *MAX_TOKENS_PARAMS):
        raise RegistryError("max_tokens_param must be max_tokens or max_completion_tokens (or unset for the "
                            f"provider's default), got {v['max_tokens_param']!r}")
    out["max_tokens_param"] = v["max_tokens_param"]
    out["max_parallel"] = _number(v["max_parallel"], "max_parallel", integer=True, minimum=1)
    for f in ("connect_timeout", "first_token_timeout", "idle_timeout"):
        out[f] = _number(v[f], f, strict=True)
    return {f: out[f] for f in DEPLOYMENT_FIELDS}


def validate_fallbacks(names: object) -> tuple[str, ...]:
    """A group's fallbacks as given (a list of names), each checked as a name; the graph is checked apart."""
    if names is None:
        return ()
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise RegistryError(f"fallbacks must be a list of model names, got {names!r}")
    return tuple(validate_group_name(n, "fallback") for n in names)


def validate_fallback_graph(fallbacks: Mapping[str, Sequence[str]], aliases: Mapping[str, str]) -> None:
    """Every group's fallbacks (`fallbacks`: group -> names, `aliases`: alias -> group) name existing groups or
    aliases, never the group itself, none twice, and they never loop back (A -> B -> A); the first problem
    as a one-line RegistryError."""
    edges: dict[str, list[str]] = {}
    for group in sorted(fallbacks):
        seen: dict[str, str] = {}
        for name in fallbacks[group]:
            target = aliases.get(name, name)
            if target not in fallbacks:
                raise RegistryError(f"fallback {name!r} of model {group!r} is not a model or alias in the registry")
            if target == group:
                raise RegistryError(f"model {group!r} cannot fall back to itself"
                                    + (f" (alias {name!r})" if name != group else ""))
            if target in seen:
                raise RegistryError(f"model {group!r} names fallback {target!r} twice ({seen[target]!r} and "
                                    f"{name!r})" if seen[target] != name else
                                    f"model {group!r} names fallback {name!r} twice")
            seen[target] = name
        edges[group] = list(seen)
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no loop through it)
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(edges[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                loop = path[path.index(nxt):] + [nxt]
                raise RegistryError(f"fallbacks would loop: {' -> '.join(loop)}")
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(edges[nxt]))


def fallback_chain(group: str, fallbacks: Mapping[str, Sequence[str]], aliases: Mapping[str, str]) -> list[str]:
    """The groups a request for `group` may reach, in the order the dispatcher tries them (the group, then
    each exhausted group's fallbacks in turn, each group once)."""
    chain, i = [group], 0
    while i < len(chain):
        for name in fallbacks.get(chain[i], ()):
            target = aliases.get(name, name)
            if target not in chain:
                chain.append(target)
        i += 1
    return chain


def fallback_referrers(names: Iterable[str], fallbacks: Mapping[str, Sequence[str]],
                       exclude: str | None = None) -> list[str]:
    """The groups (other than `exclude`) whose fallbacks name any of `names`."""
    wanted = set(names)
    return [g for g in sorted(fallbacks) if g != exclude and wanted.intersection(fallbacks[g])]


def group_limits(rpm: object, tpm: object) -> tuple[int | None, int | None]:
    return (_number(rpm, "rpm", integer=True) or None, _number(tpm, "tpm", integer=True) or None)



def validate_url(url: object, what: str = "endpoint") -> str:
    if not isinstance(url, str):
        raise RegistryError(f"{what} must be an http(s) URL with a host, got {url!r}")
    try:
        parts = urlsplit(url.strip())
        host, _ = parts.hostname, parts.port  # both raise ValueError on a malformed netloc or port
    except ValueError:
        raise RegistryError(f"{what} is not a valid URL (bad host or port): {url!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise RegistryError(f"{what} must be an http(s) URL with a host, got {url!r}")
    return url.strip()

