"""The model registry: what the router serves (model groups and deployments, aliases, agents, client keys,
agent tokens), stored in SQLite (the embedded default, `SQLITE_DB_PATH`) or in Postgres (`DATABASE_URL`,
shared by several replicas) behind one interface, `RegistryStore`; `open_store` picks the one configured.

model.py entries, `Snapshot`, validation; store.py the interface and the SQL both databases share;
sqlite.py and postgres.py what differs (connecting, migrations, change versions; Postgres's LISTEN/NOTIFY).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.registry.model import (
    AGENT_TOKEN_PREFIX,
    DEFAULT_KIND,
    DEPLOYMENT_DEFAULTS,
    DEPLOYMENT_FIELDS,
    HOSTED_TYPES,
    KEY_PREFIX,
    MAX_TOKENS_PARAMS,
    MODEL_KINDS,
    MODEL_TYPES,
    RESERVED_TOKEN_NAMES,
    AgentEntry,
    AgentNameTaken,
    AgentToken,
    ClientKey,
    DeploymentEntry,
    GroupEntry,
    RegistryError,
    Snapshot,
    default_deployment_name,
    fallback_chain,
    fallback_referrers,
    group_limits,
    hash_key,
    strategy_names,
    validate_deployment,
    validate_fallback_graph,
    validate_fallbacks,
    validate_group_name,
    validate_strategy,
    validate_url,
)
from router.registry.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from router.registry.store import Connection, RegistryStore, RegistryUnavailable, transaction

if TYPE_CHECKING:
    from router.config import Settings

__all__ = [
    "AGENT_TOKEN_PREFIX", "DEFAULT_KIND", "DEPLOYMENT_DEFAULTS", "DEPLOYMENT_FIELDS", "HOSTED_TYPES", "KEY_PREFIX",
    "MAX_TOKENS_PARAMS", "MIGRATIONS", "MODEL_KINDS", "MODEL_TYPES", "RESERVED_TOKEN_NAMES", "SCHEMA_VERSION",
    "AgentEntry", "AgentNameTaken", "AgentToken", "ClientKey", "Connection", "DeploymentEntry", "GroupEntry",
    "RegistryError", "RegistryStore", "RegistryUnavailable", "Snapshot", "SqliteStore", "default_deployment_name",
    "fallback_chain", "fallback_referrers", "group_limits", "hash_key", "open_store", "strategy_names", "transaction",
    "validate_deployment",
    "validate_fallback_graph", "validate_fallbacks", "validate_group_name", "validate_strategy", "validate_url",
]


def open_store(settings: Settings) -> RegistryStore:
    """Postgres when DATABASE_URL is set, else the SQLite file SQLITE_DB_PATH (psycopg is imported only then)."""
    if settings.database_url is not None:
        from router.registry.postgres import PostgresStore

        return PostgresStore(settings.database_url.get_secret_value())
    return SqliteStore(settings.sqlite_db_path)
