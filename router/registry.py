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
SCHEMA_VERSION = len(MIGRATIONS)
KEY_PREFIX = "sk-router-"


class RegistryError(ValueError):
    """Invalid input for the registry; the message is one line for the user."""


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
class AgentEntry:
    name: str
    endpoint: str
    models: tuple[str, ...]
    registered_at: float
    last_heartbeat: float


def validate_url(url: str, what: str = "endpoint") -> str:
    parts = urlsplit(url.strip()) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"{what} must be an http(s) URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise RegistryError(f"{what} has an invalid port: {url!r}") from None
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

    def connect(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
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
                "SELECT name, type, endpoint, kind, created_at, updated_at, rpm, tpm FROM models ORDER BY name")]
            agents = [
                AgentEntry(name, endpoint, tuple(orjson.loads(models_json)), reg, hb)
                for name, endpoint, models_json, reg, hb in conn.execute(
                    "SELECT name, endpoint, models, registered_at, last_heartbeat FROM agents ORDER BY name")
            ]
        finally:
            conn.execute("COMMIT")
        return models, agents

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

    def register_agent(self, conn: sqlite3.Connection, name: str, endpoint: str,
                       models: Sequence[str], now: float) -> AgentEntry:
        conn.execute(
            """INSERT INTO agents (name, endpoint, models, registered_at, last_heartbeat)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET endpoint = excluded.endpoint, models = excluded.models,
                   registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat""",
            (name, endpoint, orjson.dumps(list(models)).decode(), now, now),
        )
        return AgentEntry(name, endpoint, tuple(models), now, now)

    def heartbeat(self, conn: sqlite3.Connection, name: str, now: float) -> bool:
        return conn.execute("UPDATE agents SET last_heartbeat = ? WHERE name = ?", (now, name)).rowcount > 0
