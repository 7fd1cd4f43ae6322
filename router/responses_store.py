"""Stored responses of the Responses API for deployments the router translates (chat-only ones): `store`
keeps a response for `RESPONSES_STORE_DAYS` days, so `previous_response_id` can continue its conversation and
`GET`/`DELETE /v1/responses/{id}` find it. Kept beside the request log (its SQLite file, or the registry's
Postgres), one row per response, readable only with the key that made it (another key's id is not found).
All database work runs in a thread, on a connection of its own, one statement at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import orjson

from router.config import Settings
from router.observability.request_log import LogStore
from router.registry.store import Connection

JSON = dict[str, Any]


class ResponseStore:
    def __init__(self, settings: Settings) -> None:
        self.log = LogStore(settings)
        self.ttl = settings.responses_store_days * 86400
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            if self._conn is None:
                self._conn = self.log.connect()
            try:
                cursor = self._conn.execute(sql, params)
                return list(cursor.fetchall()) if sql.lstrip().startswith("SELECT") else [cursor.rowcount]
            except Exception:
                conn, self._conn = self._conn, None
                conn.close()
                raise

    async def put(self, response_id: str, key_name: str | None, response: JSON, messages: list[JSON]) -> None:
        now = time.time()
        await asyncio.to_thread(self._run, "DELETE FROM stored_responses WHERE expires_at < ?", (now,))
        await asyncio.to_thread(
            self._run, "INSERT INTO stored_responses (id, key_name, created_at, expires_at, response, messages) "
            "VALUES (?, ?, ?, ?, ?, ?)", (response_id, key_name, now, now + self.ttl, orjson.dumps(response).decode(),
                                          orjson.dumps(messages).decode()))

    async def get(self, response_id: str, key_name: str | None) -> tuple[JSON, list[JSON]] | None:
        rows = await asyncio.to_thread(
            self._run, "SELECT response, messages, key_name FROM stored_responses WHERE id = ? AND expires_at >= ?",
            (response_id, time.time()))
        if not rows or rows[0][2] != key_name:
            return None
        return orjson.loads(rows[0][0]), orjson.loads(rows[0][1])

    async def delete(self, response_id: str, key_name: str | None) -> bool:
        found = await self.get(response_id, key_name)
        if found is None:
            return False
        await asyncio.to_thread(self._run, "DELETE FROM stored_responses WHERE id = ?", (response_id,))
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
