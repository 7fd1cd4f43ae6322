"""What the registry tests read and write behind the CLI's back, in whichever database the running test's
processes use: Postgres when the `registry_backend` fixture set DATABASE_URL (processes.TEST_ENV), else the
SQLite file of the work folder."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from tests.support import processes


def database_url() -> str | None:
    return processes.TEST_ENV.get("DATABASE_URL")


def execute(workdir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement (SQLite's `?` placeholders) and commit; the rows it returned."""
    url = database_url()
    if url is not None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    conn = sqlite3.connect(workdir / "data" / "models.db")
    try:
        rows = conn.execute(sql, args).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def rows(workdir: Path, sql: str) -> list[tuple[Any, ...]]:
    return execute(workdir, sql)


def db_digest(workdir: Path) -> str:
    """Every row of the model tables (groups, deployments, aliases), timestamps included."""
    tables = [rows(workdir, f"SELECT * FROM {t} ORDER BY 1") for t in ("model_groups", "deployments", "aliases")]
    return hashlib.sha256(repr(tables).encode()).hexdigest()


def stored_text(workdir: Path) -> str:
    """Everything the registry stores, as text (to check that a secret is not in it)."""
    if database_url() is None:
        return (workdir / "data" / "models.db").read_bytes().decode("latin-1")
    return repr([rows(workdir, f"SELECT * FROM {t}") for t in ("model_groups", "deployments", "aliases", "agents",
                                                             "client_keys", "agent_tokens")])
