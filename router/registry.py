"""The SQLite registry: model groups and their deployments, aliases, agents, keys; schema migrations,
validated writes, and one-transaction reads (`RegistryStore.load` -> `Snapshot`).

This module is synchronous and owns every SQL statement. The CLI calls it
directly; the router calls it from a worker thread and keeps an in-memory
snapshot (see `router.state`), so no request ever waits on SQLite.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets
import sqlite3
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

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

# Each migration is a list of statements (or functions of the connection); the schema version is
# PRAGMA user_version. Append new migrations; never edit a released one.
MIGRATIONS: list[list[str | Callable[[sqlite3.Connection], None]]] = [
    [
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('api', 'weight')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            models TEXT NOT NULL,
            registered_at REAL NOT NULL,
            last_heartbeat REAL NOT NULL
        )""",
    ],
]
MIGRATIONS.append([
    # per-model limits, and client keys (only a hash of each key is stored)
    "ALTER TABLE models ADD COLUMN rpm INTEGER",
    "ALTER TABLE models ADD COLUMN tpm INTEGER",
    """CREATE TABLE client_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL UNIQUE,
        key_prefix TEXT NOT NULL,
        rpm INTEGER,
        tpm INTEGER,
        models TEXT,
        expires_at REAL,
        created_at REAL NOT NULL,
        revoked_at REAL
    )""",
])
MIGRATIONS.append([
    # per-agent registration tokens (only a hash is stored); the token an agent registered with is bound
    # to its name; `models`: hosted-provider names that agents with this token may still announce
    """CREATE TABLE agent_tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        token_prefix TEXT NOT NULL,
        models TEXT,
        created_at REAL NOT NULL,
        revoked_at REAL
    )""",
    "ALTER TABLE agents ADD COLUMN token_name TEXT",
    # which field carries the output-token limit upstream: NULL (the provider's default),
    # 'max_tokens' or 'max_completion_tokens'
    "ALTER TABLE models ADD COLUMN max_tokens_param TEXT",
])
def default_deployment_name(type: str, endpoint: str, taken: Iterable[str] = ()) -> str:
    """`{type}-{host}`, with `-2`, `-3`... appended while the name is in `taken`."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", urlsplit(endpoint).hostname or "") or "default"
    base, used = f"{type}-{host}"[:90], set(taken)
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    return name


def _models_to_groups(conn: sqlite3.Connection) -> None:
    """Migration 4: each `models` row becomes a model group (its limits) with one deployment."""
    rows = conn.execute("SELECT name, type, endpoint, kind, rpm, tpm, max_tokens_param, created_at, updated_at "
                        "FROM models").fetchall()
    for name, type, endpoint, kind, rpm, tpm, param, created, updated in rows:
        conn.execute("INSERT INTO model_groups (name, rpm, tpm, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                     (name, rpm, tpm, created, updated))
        conn.execute("INSERT INTO deployments (model_group, name, type, endpoint, kind, max_tokens_param, "
                     "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (name, default_deployment_name(type, endpoint), type, endpoint, kind, param, created, updated))
    conn.execute("DROP TABLE models")


MIGRATIONS.append([
    # model groups (public names) served by deployments; aliases; `models` rows move over and go away
    """CREATE TABLE model_groups (
        name TEXT PRIMARY KEY,
        strategy TEXT,
        rpm INTEGER,
        tpm INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE deployments (
        id INTEGER PRIMARY KEY,
        model_group TEXT NOT NULL REFERENCES model_groups(name),
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('api', 'weight')),
        upstream_model TEXT,
        key_env TEXT,
        input_price REAL,
        output_price REAL,
        context_window INTEGER,
        weight REAL NOT NULL DEFAULT 1,
        rpm INTEGER,
        tpm INTEGER,
        timeout REAL,
        enabled INTEGER NOT NULL DEFAULT 1,
        max_tokens_param TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (model_group, name),
        UNIQUE (model_group, type, endpoint, upstream_model)
    )""",
    # upstream_model NULL means the group's name: the same deployment twice is refused either way
    "CREATE UNIQUE INDEX deployments_target ON deployments "
    "(model_group, type, endpoint, COALESCE(upstream_model, model_group))",
    "CREATE TABLE aliases (alias TEXT PRIMARY KEY, model_group TEXT NOT NULL REFERENCES model_groups(name))",
    _models_to_groups,
])
SCHEMA_VERSION = len(MIGRATIONS)
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

    def values(self) -> dict[str, Any]:
        """The editable fields (DEPLOYMENT_FIELDS) as a dict."""
        return {f: getattr(self, f) for f in DEPLOYMENT_FIELDS}


#: a deployment's editable fields, in file and table order
DEPLOYMENT_FIELDS = ("name", "type", "endpoint", "kind", "upstream_model", "key_env", "input_price",
                     "output_price", "context_window", "weight", "rpm", "tpm", "timeout", "enabled",
                     "max_tokens_param")
DEPLOYMENT_DEFAULTS: dict[str, Any] = {"name": None, "kind": None, "upstream_model": None, "key_env": None,
                                       "input_price": None,
                                       "output_price": None, "context_window": None, "weight": 1.0, "rpm": None,
                                       "tpm": None, "timeout": None, "enabled": True, "max_tokens_param": None}


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
    return {f: out[f] for f in DEPLOYMENT_FIELDS}


def group_limits(rpm: object, tpm: object) -> tuple[int | None, int | None]:
    return (_number(rpm, "rpm", integer=True) or None, _number(tpm, "tpm", integer=True) or None)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: all of the block's writes, or none (inside another: part of that one)."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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


class RegistryStore:
    """Opens the database (creating its folder), migrates it, reads and writes it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self, busy_timeout: float = 10.0) -> sqlite3.Connection:
        """A connection that waits up to `busy_timeout` seconds for another writer's lock."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._migrate(conn)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")  # serialises concurrent workers migrating at once
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i]:
                    if callable(stmt):
                        stmt(conn)
                    else:
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- reads -------------------------------------------------------------

    _DEPLOYMENT_COLUMNS = ("id, model_group, name, type, endpoint, kind, upstream_model, key_env, input_price, "
                           "output_price, context_window, weight, rpm, tpm, timeout, enabled, max_tokens_param, "
                           "created_at, updated_at")

    def load(self, conn: sqlite3.Connection) -> Snapshot:
        """The whole registry, read in one transaction (a consistent snapshot)."""
        conn.execute("BEGIN")
        try:
            return Snapshot(self.load_groups(conn), self.load_deployments(conn), self.load_aliases(conn),
                            [self._agent(row) for row in conn.execute(
                                f"SELECT {self._AGENT_COLUMNS} FROM agents ORDER BY name")],
                            self.load_keys(conn), self.load_agent_tokens(conn))
        finally:
            conn.execute("COMMIT")

    _AGENT_COLUMNS = "name, endpoint, models, registered_at, last_heartbeat, token_name"

    @staticmethod
    def load_groups(conn: sqlite3.Connection) -> list[GroupEntry]:
        return [GroupEntry(*row) for row in conn.execute(
            "SELECT name, strategy, rpm, tpm, created_at, updated_at FROM model_groups ORDER BY name")]

    def load_deployments(self, conn: sqlite3.Connection, group: str | None = None) -> list[DeploymentEntry]:
        where, args = ("WHERE model_group = ?", (group,)) if group is not None else ("", ())
        rows = conn.execute(f"SELECT {self._DEPLOYMENT_COLUMNS} FROM deployments {where} ORDER BY model_group, id",
                            args)
        return [DeploymentEntry(id, group_, name, type, endpoint, kind, upstream, key_env, inp, outp, ctx, weight,
                                rpm, tpm, timeout, bool(enabled), param, created, updated)
                for (id, group_, name, type, endpoint, kind, upstream, key_env, inp, outp, ctx, weight, rpm, tpm,
                     timeout, enabled, param, created, updated) in rows]

    @staticmethod
    def load_aliases(conn: sqlite3.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT alias, model_group FROM aliases ORDER BY alias").fetchall())

    @staticmethod
    def _agent(row: tuple[str, str, str, float, float, str | None]) -> AgentEntry:
        name, endpoint, models_json, reg, hb, token_name = row
        return AgentEntry(name, endpoint, tuple(orjson.loads(models_json)), reg, hb, token_name)

    def load_agent(self, conn: sqlite3.Connection, name: str) -> AgentEntry | None:
        row = conn.execute(f"SELECT {self._AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        return self._agent(row) if row is not None else None

    def load_agent_tokens(self, conn: sqlite3.Connection) -> list[AgentToken]:
        return [
            AgentToken(name, token_hash, prefix, frozenset(orjson.loads(models)) if models is not None else None,
                       created, revoked)
            for name, token_hash, prefix, models, created, revoked in conn.execute(
                "SELECT name, token_hash, token_prefix, models, created_at, revoked_at FROM agent_tokens ORDER BY name")
        ]

    def load_keys(self, conn: sqlite3.Connection) -> list[ClientKey]:
        return [
            ClientKey(name, key_hash, prefix, rpm, tpm,
                      frozenset(orjson.loads(models)) if models is not None else None, expires, created, revoked)
            for name, key_hash, prefix, rpm, tpm, models, expires, created, revoked in conn.execute(
                "SELECT name, key_hash, key_prefix, rpm, tpm, models, expires_at, created_at, revoked_at "
                "FROM client_keys ORDER BY name")
        ]

    @staticmethod
    def data_version(conn: sqlite3.Connection) -> int:
        """Changes whenever another connection commits to the database."""
        return conn.execute("PRAGMA data_version").fetchone()[0]

    # -- groups and deployments: primitives (the caller holds a transaction) -----------------------

    @staticmethod
    def group(conn: sqlite3.Connection, name: str) -> GroupEntry | None:
        row = conn.execute("SELECT name, strategy, rpm, tpm, created_at, updated_at FROM model_groups "
                           "WHERE name = ?", (name,)).fetchone()
        return GroupEntry(*row) if row is not None else None

    def put_group(self, conn: sqlite3.Connection, name: str, strategy: str | None, rpm: int | None,
                  tpm: int | None, now: float) -> None:
        """Insert the group, or set its strategy and limits."""
        name = validate_group_name(name)
        strategy = validate_strategy(strategy)
        rpm, tpm = group_limits(rpm, tpm)
        if conn.execute("SELECT 1 FROM aliases WHERE alias = ?", (name,)).fetchone():
            raise RegistryError(f"{name!r} is an alias; remove the alias first")
        conn.execute("INSERT INTO model_groups (name, strategy, rpm, tpm, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET strategy = excluded.strategy, "
                     "rpm = excluded.rpm, tpm = excluded.tpm, updated_at = excluded.updated_at",
                     (name, strategy, rpm, tpm, now, now))

    def put_deployment(self, conn: sqlite3.Connection, group: str, values: Mapping[str, Any], now: float,
                       id: int | None = None) -> None:
        """Insert a deployment (`id` None) or replace the editable fields of deployment `id`; `values` as
        validate_deployment returns them. The same deployment twice in a group is a RegistryError."""
        cols = list(DEPLOYMENT_FIELDS)
        args = [values[c] for c in cols]
        try:
            if id is None:
                conn.execute(f"INSERT INTO deployments (model_group, {', '.join(cols)}, created_at, updated_at) "
                             f"VALUES ({', '.join('?' * (len(cols) + 3))})", (group, *args, now, now))
            else:
                conn.execute(f"UPDATE deployments SET {', '.join(c + ' = ?' for c in cols)}, updated_at = ? "
                             "WHERE id = ?", (*args, now, id))
        except sqlite3.IntegrityError as exc:
            what = (f"a deployment named {values['name']!r}" if "name" in str(exc) and "endpoint" not in str(exc)
                    else f"the deployment {values['type']} at {values['endpoint']} (upstream model "
                         f"{values['upstream_model'] or group!r})")
            raise RegistryError(f"model {group!r}: {what} already exists") from None

    @staticmethod
    def delete_deployment(conn: sqlite3.Connection, id: int) -> None:
        conn.execute("DELETE FROM deployments WHERE id = ?", (id,))

    @staticmethod
    def delete_group(conn: sqlite3.Connection, name: str) -> bool:
        conn.execute("DELETE FROM aliases WHERE model_group = ?", (name,))
        conn.execute("DELETE FROM deployments WHERE model_group = ?", (name,))
        return conn.execute("DELETE FROM model_groups WHERE name = ?", (name,)).rowcount > 0

    @staticmethod
    def put_alias(conn: sqlite3.Connection, alias: str, group: str) -> None:
        alias = validate_group_name(alias, "alias")
        if conn.execute("SELECT 1 FROM model_groups WHERE name = ?", (alias,)).fetchone():
            raise RegistryError(f"{alias!r} is a model name; an alias must not shadow a model")
        if not conn.execute("SELECT 1 FROM model_groups WHERE name = ?", (group,)).fetchone():
            raise RegistryError(f"model {group!r} is not in the registry")
        conn.execute("INSERT INTO aliases (alias, model_group) VALUES (?, ?) ON CONFLICT(alias) DO UPDATE "
                     "SET model_group = excluded.model_group", (alias, group))

    @staticmethod
    def delete_alias(conn: sqlite3.Connection, alias: str) -> bool:
        return conn.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount > 0

    # -- groups and deployments: commands (each one transaction) ----------------------------------

    def add_deployment(self, conn: sqlite3.Connection, group: str, values: Mapping[str, Any],
                       strategy: str | None = None) -> DeploymentEntry:
        """Add a deployment to `group`, creating the group (with `strategy`) if it is new. `values`: some
        of DEPLOYMENT_FIELDS (type and endpoint required); a default name is made unique in the group."""
        group = validate_group_name(group)
        now = time.time()
        with transaction(conn):
            existing = self.group(conn, group)
            if existing is None:
                self.put_group(conn, group, strategy, None, None, now)
            elif strategy is not None:
                self.put_group(conn, group, strategy, existing.rpm, existing.tpm, now)
            checked = validate_deployment(group, values)
            if values.get("name") is None:
                taken = [d.name for d in self.load_deployments(conn, group)]
                checked["name"] = default_deployment_name(checked["type"], checked["endpoint"], taken)
            self.put_deployment(conn, group, checked, now)
        return next(d for d in self.load_deployments(conn, group) if d.name == checked["name"])

    def _one_deployment(self, conn: sqlite3.Connection, group: str, name: str | None) -> DeploymentEntry:
        deployments = self.load_deployments(conn, group)
        if not deployments:
            raise RegistryError(f"model {group!r} is not in the registry")
        if name is None:
            if len(deployments) > 1:
                raise RegistryError(f"model {group!r} has {len(deployments)} deployments "
                                    f"({', '.join(d.name for d in deployments)}); name one with --deployment")
            return deployments[0]
        for d in deployments:
            if d.name == name:
                return d
        raise RegistryError(f"model {group!r} has no deployment {name!r} "
                            f"(it has {', '.join(d.name for d in deployments)})")

    def update_deployment(self, conn: sqlite3.Connection, group: str, name: str | None,
                          changes: Mapping[str, Any]) -> DeploymentEntry:
        """Change fields of one deployment in place (`name` None: the group's only deployment)."""
        with transaction(conn):
            old = self._one_deployment(conn, group, name)
            values = old.values()
            if "type" in changes and "kind" not in changes:
                values["kind"] = None  # inferred again for the new type
            values.update(changes)
            checked = validate_deployment(group, values, check_env="key_env" in changes)
            self.put_deployment(conn, group, checked, time.time(), id=old.id)
        return next(d for d in self.load_deployments(conn, group) if d.id == old.id)

    def update_group(self, conn: sqlite3.Connection, group: str, changes: Mapping[str, Any]) -> GroupEntry:
        """Change a group's strategy, rpm or tpm (keys of `changes`)."""
        with transaction(conn):
            old = self.group(conn, group)
            if old is None:
                raise RegistryError(f"model {group!r} is not in the registry")
            merged = {"strategy": old.strategy, "rpm": old.rpm, "tpm": old.tpm, **changes}
            self.put_group(conn, group, merged["strategy"], merged["rpm"], merged["tpm"], time.time())
            new = self.group(conn, group)
        assert new is not None
        return new

    def remove_model(self, conn: sqlite3.Connection, name: str, deployment: str | None = None) -> bool:
        """Remove the group (its deployments and aliases), or only one of its deployments (the group goes
        with its last one). False when there was nothing to remove."""
        with transaction(conn):
            if deployment is None:
                return self.delete_group(conn, name)
            target = next((d for d in self.load_deployments(conn, name) if d.name == deployment), None)
            if target is None:
                return False
            self.delete_deployment(conn, target.id)
            if not self.load_deployments(conn, name):
                self.delete_group(conn, name)
            return True

    def add_alias(self, conn: sqlite3.Connection, alias: str, group: str) -> None:
        with transaction(conn):
            self.put_alias(conn, alias, group)

    def remove_alias(self, conn: sqlite3.Connection, alias: str) -> bool:
        return self.delete_alias(conn, alias)

    def set_model_limits(self, conn: sqlite3.Connection, name: str, rpm: int | None, tpm: int | None) -> bool:
        """The group's own limits, across all clients (0 or None: none)."""
        try:
            self.update_group(conn, name, {"rpm": rpm, "tpm": tpm})
        except RegistryError:
            if self.group(conn, name) is None:
                return False
            raise
        return True

    def set_max_tokens_param(self, conn: sqlite3.Connection, name: str, param: str | None) -> bool:
        """Which field carries the output-token limit upstream, for every deployment of the group
        (None: the provider's default)."""
        if param not in (None, *MAX_TOKENS_PARAMS):
            raise RegistryError("--max-tokens-param must be max_tokens, max_completion_tokens or default")
        return conn.execute("UPDATE deployments SET max_tokens_param = ?, updated_at = ? WHERE model_group = ?",
                            (param, time.time(), name)).rowcount > 0

    # -- client keys ----------------------------------------------------------------

    def create_key(self, conn: sqlite3.Connection, name: str | None, rpm: int | None, tpm: int | None,
                   models: list[str] | None, expires_at: float | None) -> tuple[str, ClientKey]:
        """A new key: the secret is returned once; only its hash is stored."""
        for value, what in ((rpm, "rpm"), (tpm, "tpm")):
            if value is not None and value < 1:
                raise RegistryError(f"{what} must be a positive number")
        if expires_at is not None and expires_at <= time.time():
            raise RegistryError("the expiry must be in the future")
        if models is not None and (not models or not all(m.strip() for m in models)):
            raise RegistryError("--models must list at least one model name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = secret[: len(KEY_PREFIX) + 6]
        name = (name or f"key-{secret[len(KEY_PREFIX):len(KEY_PREFIX) + 6]}").strip()
        if not name:
            raise RegistryError("key name must not be empty")
        now = time.time()
        try:
            conn.execute(
                "INSERT INTO client_keys (name, key_hash, key_prefix, rpm, tpm, models, expires_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, hash_key(secret), prefix, rpm, tpm,
                 orjson.dumps(sorted(set(models))).decode() if models is not None else None, expires_at, now))
        except sqlite3.IntegrityError:
            raise RegistryError(f"a key named {name!r} already exists") from None
        return secret, ClientKey(name, hash_key(secret), prefix, rpm, tpm,
                                 frozenset(models) if models is not None else None, expires_at, now, None)

    def revoke_key(self, conn: sqlite3.Connection, name_or_prefix: str) -> int:
        return conn.execute("UPDATE client_keys SET revoked_at = ? WHERE revoked_at IS NULL AND "
                            "(name = ? OR key_prefix = ?)", (time.time(), name_or_prefix, name_or_prefix)).rowcount

    def sync_models(self, conn: sqlite3.Connection, type: str, endpoint: str, kind: str,
                    names: Iterable[str]) -> dict[str, list[str]]:
        """Upsert `names` as groups with a deployment of `type` at `endpoint`, all or nothing.

        A group that has a deployment of this type gets that deployment's endpoint and kind updated; a
        group served only by other types is skipped (a listing must not add a paid route to a group someone
        set up otherwise). Returns the names added, updated, unchanged and skipped.
        """
        validate_deployment("x", {"type": type, "endpoint": endpoint, "kind": kind})
        result: dict[str, list[str]] = {"added": [], "updated": [], "unchanged": [], "skipped": []}
        now = time.time()
        with transaction(conn):
            by_group: dict[str, list[DeploymentEntry]] = {}
            for d in self.load_deployments(conn):
                by_group.setdefault(d.group, []).append(d)
            for name in sorted(set(names)):
                current = by_group.get(name)
                mine = next((d for d in current or () if d.type == type), None)
                if current is None:
                    self.put_group(conn, name, None, None, None, now)
                    self.put_deployment(conn, name, validate_deployment(
                        name, {"type": type, "endpoint": endpoint, "kind": kind}), now)
                    result["added"].append(name)
                elif mine is None:
                    result["skipped"].append(name)
                elif (mine.endpoint, mine.kind) != (endpoint, kind):
                    values = {**mine.values(), "endpoint": endpoint, "kind": kind}
                    self.put_deployment(conn, name, validate_deployment(name, values, check_env=False), now,
                                        id=mine.id)
                    result["updated"].append(name)
                else:
                    result["unchanged"].append(name)
        return result

    # -- agent writes --------------------------------------------------------

    def register_agent(self, conn: sqlite3.Connection, name: str, endpoint: str, models: Sequence[str],
                       now: float, token_name: str, take_over: bool = False) -> AgentEntry:
        """Insert or update the agent, in one statement: a name registered with another credential is
        left alone (AgentNameTaken) unless `take_over` (the master key). Rows from before credentials
        (token_name NULL) go to the first credential that registers them."""
        updated = conn.execute(
            """INSERT INTO agents (name, endpoint, models, registered_at, last_heartbeat, token_name)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET endpoint = excluded.endpoint, models = excluded.models,
                   registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat,
                   token_name = excluded.token_name
               WHERE ? OR agents.token_name IS NULL OR agents.token_name = excluded.token_name""",
            (name, endpoint, orjson.dumps(list(models)).decode(), now, now, token_name, take_over),
        ).rowcount
        if not updated:
            raise AgentNameTaken(f"agent {name!r} is registered with another credential")
        return AgentEntry(name, endpoint, tuple(models), now, now, token_name)

    def heartbeat(self, conn: sqlite3.Connection, name: str, now: float, token_name: str,
                  take_over: bool = False) -> AgentEntry | None:
        """The agent after its heartbeat; None if it is unknown; AgentNameTaken if another credential's."""
        if conn.execute("UPDATE agents SET last_heartbeat = ? WHERE name = ? AND (? OR token_name IS NULL "
                        "OR token_name = ?)", (now, name, take_over, token_name)).rowcount:
            return self.load_agent(conn, name)
        if self.load_agent(conn, name) is not None:
            raise AgentNameTaken(f"agent {name!r} is registered with another credential")
        return None

    def delete_dead_agents(self, conn: sqlite3.Connection, heard_before: float,
                           names: Sequence[str] | None = None) -> list[str]:
        """Delete the agents (among `names`, when given: those the caller knows to be dead, heartbeats living
        in memory and Redis) whose stored heartbeat or registration is older than `heard_before`; their names."""
        if names is None:
            return [row[0] for row in conn.execute(
                "DELETE FROM agents WHERE last_heartbeat < ? RETURNING name", (heard_before,))]
        return [row[0] for row in conn.execute(
            "DELETE FROM agents WHERE last_heartbeat < ? AND name IN (SELECT value FROM json_each(?)) RETURNING name",
            (heard_before, orjson.dumps(list(names)).decode()))]

    # -- agent tokens ----------------------------------------------------------------

    def create_agent_token(self, conn: sqlite3.Connection, name: str,
                           models: list[str] | None) -> tuple[str, AgentToken]:
        """A new agent token: the secret is returned once; only its hash is stored."""
        name = name.strip()
        if not name:
            raise RegistryError("agent token name must not be empty")
        if name in RESERVED_TOKEN_NAMES:
            raise RegistryError(f"{name!r} is reserved; choose another name")
        if models is not None and (not models or not all(m.strip() for m in models)):
            raise RegistryError("--models must list at least one model name")
        secret = AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        prefix = secret[: len(AGENT_TOKEN_PREFIX) + 6]
        stored = sorted({m.strip() for m in models}) if models is not None else None
        now = time.time()
        try:
            conn.execute(
                "INSERT INTO agent_tokens (name, token_hash, token_prefix, models, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, hash_key(secret), prefix, orjson.dumps(stored).decode() if stored is not None else None, now))
        except sqlite3.IntegrityError:
            raise RegistryError(f"an agent token named {name!r} already exists") from None
        return secret, AgentToken(name, hash_key(secret), prefix,
                                  frozenset(stored) if stored is not None else None, now, None)

    def revoke_agent_token(self, conn: sqlite3.Connection, name_or_prefix: str) -> int:
        return conn.execute("UPDATE agent_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND "
                            "(name = ? OR token_prefix = ?)",
                            (time.time(), name_or_prefix, name_or_prefix)).rowcount
