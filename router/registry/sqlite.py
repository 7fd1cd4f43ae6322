"""The registry in SQLite: connecting (WAL, busy timeout), migrations (PRAGMA user_version; a migration may be
a Python step), the change version (PRAGMA data_version) and its few statements that Postgres does not share."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence

import orjson

from router.registry.model import default_deployment_name
from router.registry.store import Connection, RegistryStore, RegistryUnavailable

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
MIGRATIONS.append([
    # requests a deployment serves at once before it queues them (a local server's batch; NULL: by type)
    "ALTER TABLE deployments ADD COLUMN max_parallel INTEGER",
])
MIGRATIONS.append([
    # fallbacks: a JSON array of the groups (or aliases) tried once the group's deployments are exhausted
    # (NULL: none), and whether content-policy refusals go to them; timeouts per deployment (NULL: the setting)
    "ALTER TABLE model_groups ADD COLUMN fallbacks TEXT",
    "ALTER TABLE model_groups ADD COLUMN content_policy_fallbacks INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE deployments ADD COLUMN connect_timeout REAL",
    "ALTER TABLE deployments ADD COLUMN first_token_timeout REAL",
    "ALTER TABLE deployments ADD COLUMN idle_timeout REAL",
])
MIGRATIONS.append([
    # budgets per key: at most `budget` USD per `budget_period` seconds (NULL: for the key's life), periods
    # counted from `budget_start`; `log_content`: store this key's prompts and answers in the request log
    # (NULL: REQUEST_LOG_CONTENT decides)
    "ALTER TABLE client_keys ADD COLUMN budget REAL",
    "ALTER TABLE client_keys ADD COLUMN budget_period REAL",
    "ALTER TABLE client_keys ADD COLUMN budget_start REAL",
    "ALTER TABLE client_keys ADD COLUMN log_content INTEGER",
])
SCHEMA_VERSION = len(MIGRATIONS)


def open_sqlite(path: str, busy_timeout: float,
                migrations: Sequence[Sequence[str | Callable[[sqlite3.Connection], None]]]) -> sqlite3.Connection:
    """A connection to the SQLite file at `path` (its folder made): autocommit (transactions are explicit), WAL,
    waiting up to `busy_timeout` seconds for another writer's lock, migrated to the end of `migrations` (each a
    list of statements or Python steps; the version is PRAGMA user_version; concurrent openers are serialised)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    if conn.execute("PRAGMA user_version").fetchone()[0] >= len(migrations):
        return conn
    conn.execute("BEGIN IMMEDIATE")  # serialises concurrent workers migrating at once
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for i in range(version, len(migrations)):
            for stmt in migrations[i]:
                if callable(stmt):
                    stmt(conn)
                else:
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {i + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return conn


class SqliteStore(RegistryStore):
    """The registry in one SQLite file (the embedded default): opens it (creating its folder), migrates it."""

    integrity_errors = (sqlite3.IntegrityError,)
    unavailable_errors = (sqlite3.OperationalError, RegistryUnavailable)
    database_errors = (sqlite3.Error, RegistryUnavailable)

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def location(self) -> str:
        return self.path

    def connect(self, busy_timeout: float = 10.0) -> sqlite3.Connection:
        """A connection that waits up to `busy_timeout` seconds for another writer's lock."""
        return open_sqlite(self.path, busy_timeout, MIGRATIONS)

    def data_version(self, conn: Connection) -> int:
        """Changes whenever another connection commits to the database (not this one's own commits)."""
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def delete_dead_agents(self, conn: Connection, heard_before: float,
                           names: Sequence[str] | None = None) -> list[str]:
        if names is None:
            return [row[0] for row in conn.execute(
                "DELETE FROM agents WHERE last_heartbeat < ? RETURNING name", (heard_before,))]
        return [row[0] for row in conn.execute(
            "DELETE FROM agents WHERE last_heartbeat < ? AND name IN (SELECT value FROM json_each(?)) RETURNING name",
            (heard_before, orjson.dumps(list(names)).decode()))]
