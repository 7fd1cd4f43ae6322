"""The SQLite model registry: schema migrations, validated writes, and reads.

This module is synchronous and owns every SQL statement. The CLI calls it
directly; the router calls it from a worker thread and keeps an in-memory
snapshot (see `router.state`), so no request ever waits on SQLite.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

MODEL_TYPES = (
    "local", "openai", "llm-d", "anthropic", "google", "openrouter",
    "grok", "groq", "venice", "huggingface", "dummy",
)
MODEL_KINDS = ("api", "weight")

# Each migration is a list of statements; the schema version is PRAGMA user_version.
# Append new migrations (pricing, aliases, limits...); never edit a released one.
MIGRATIONS: list[list[str]] = [
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
class ModelEntry:
    name: str
    type: str
    endpoint: str
    kind: str
    created_at: float
    updated_at: float
    rpm: int | None = None
    tpm: int | None = None
    max_tokens_param: str | None = None  # the field the upstream reads the output limit from; None: its default


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


def validate_model(name: str, type: str, endpoint: str, kind: str) -> tuple[str, str, str, str]:
    name = name.strip()
    if not name:
        raise RegistryError("model name must not be empty")
    if type not in MODEL_TYPES:
        raise RegistryError(f"unknown type {type!r}; valid types: {', '.join(MODEL_TYPES)}")
    if kind not in MODEL_KINDS:
        raise RegistryError(f"kind must be 'api' or 'weight', got {kind!r}")
    return name, type, validate_url(endpoint), kind


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
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- reads -------------------------------------------------------------

    def load(self, conn: sqlite3.Connection) -> tuple[list[ModelEntry], list[AgentEntry]]:
        conn.execute("BEGIN")
        try:
            models = [ModelEntry(*row) for row in conn.execute(
                "SELECT name, type, endpoint, kind, created_at, updated_at, rpm, tpm, max_tokens_param FROM models "
                "ORDER BY name")]
            agents = [self._agent(row)
                      for row in conn.execute(f"SELECT {self._AGENT_COLUMNS} FROM agents ORDER BY name")]
        finally:
            conn.execute("COMMIT")
        return models, agents

    _AGENT_COLUMNS = "name, endpoint, models, registered_at, last_heartbeat, token_name"

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

    # -- model writes --------------------------------------------------------

    def add_model(self, conn: sqlite3.Connection, name: str, type: str, endpoint: str, kind: str) -> ModelEntry:
        name, type, endpoint, kind = validate_model(name, type, endpoint, kind)
        now = time.time()
        try:
            conn.execute(
                "INSERT INTO models (name, type, endpoint, kind, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, type, endpoint, kind, now, now),
            )
        except sqlite3.IntegrityError:
            raise RegistryError(f"model {name!r} already exists; remove it first") from None
        return ModelEntry(name, type, endpoint, kind, now, now)

    def set_model_limits(self, conn: sqlite3.Connection, name: str, rpm: int | None, tpm: int | None) -> bool:
        for value, what in ((rpm, "rpm"), (tpm, "tpm")):
            if value is not None and value < 0:
                raise RegistryError(f"{what} must be 0 (no limit) or more")
        return conn.execute("UPDATE models SET rpm = ?, tpm = ?, updated_at = ? WHERE name = ?",
                            (rpm or None, tpm or None, time.time(), name)).rowcount > 0

    def set_max_tokens_param(self, conn: sqlite3.Connection, name: str, param: str | None) -> bool:
        """Which field carries a model's output-token limit upstream (None: the provider's default)."""
        if param not in (None, "max_tokens", "max_completion_tokens"):
            raise RegistryError("--max-tokens-param must be max_tokens, max_completion_tokens or default")
        return conn.execute("UPDATE models SET max_tokens_param = ?, updated_at = ? WHERE name = ?",
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

    def remove_model(self, conn: sqlite3.Connection, name: str) -> bool:
        return conn.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount > 0

    def sync_models(self, conn: sqlite3.Connection, type: str, endpoint: str, kind: str,
                    names: Iterable[str]) -> dict[str, list[str]]:
        """Upsert `names` as models of `type` at `endpoint`, all or nothing.

        Returns the names added, updated (endpoint or kind changed), unchanged,
        and skipped (the name belongs to a model of another type).
        """
        validate_model("x", type, endpoint, kind)
        result: dict[str, list[str]] = {"added": [], "updated": [], "unchanged": [], "skipped": []}
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            existing = {row[0]: row[1:] for row in conn.execute(
                "SELECT name, type, endpoint, kind FROM models")}
            for name in sorted(set(names)):
                old = existing.get(name)
                if old is None:
                    conn.execute(
                        "INSERT INTO models (name, type, endpoint, kind, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (name, type, endpoint, kind, now, now))
                    result["added"].append(name)
                elif old[0] != type:
                    result["skipped"].append(name)
                elif (old[1], old[2]) != (endpoint, kind):
                    conn.execute("UPDATE models SET endpoint = ?, kind = ?, updated_at = ? WHERE name = ?",
                                 (endpoint, kind, now, name))
                    result["updated"].append(name)
                else:
                    result["unchanged"].append(name)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
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

    def delete_dead_agents(self, conn: sqlite3.Connection, heard_before: float) -> list[str]:
        """Delete the agents whose last heartbeat is older than `heard_before`; their names."""
        names = [row[0] for row in conn.execute(
            "DELETE FROM agents WHERE last_heartbeat < ? RETURNING name", (heard_before,))]
        return names

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
