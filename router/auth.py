"""Client identity: who sent a request, and may they use this model.

Keys are off until one exists (`router.cli create-key`) or `ROUTER_MASTER_KEY`
is set; then every request needs `Authorization: Bearer <key>` (or `x-api-key`). Only
SHA-256 hashes of keys are stored and compared, so a lookup is one hash and
one dict hit. A client is named in logs and metrics by its key's name, never
by the key. Without keys, clients are told apart by IP for rate limiting.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.types import Scope

from router.errors import RouterError
from router.registry import ClientKey, hash_key


@dataclass(frozen=True, slots=True)
class Client:
    scope: str  # rate-limit and cache scope: "key:<name>" or "ip:<address>"
    label: str  # safe to log and to use as a metric label
    key: ClientKey | None = None
    admin: bool = False


ANONYMOUS_CACHE_SCOPE = "public"


def bearer(scope: Scope) -> str | None:
    """The client's key: `Authorization: Bearer <key>`, else Anthropic's `x-api-key: <key>` (the `anthropic` SDK
    and Claude Code send that one)."""
    api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip() or None
    return api_key


class KeyTable:
    def __init__(self, master_key: SecretStr | None) -> None:
        self.master_hash = hash_key(master_key.get_secret_value()) if master_key else None
        self.keys: dict[str, ClientKey] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.master_hash is not None

    def replace(self, keys: list[ClientKey]) -> None:
        self.keys = {k.key_hash: k for k in keys if k.revoked_at is None}

    def authenticate(self, scope: Scope) -> Client:
        if not self.enabled:
            client = scope.get("client")
            return Client(f"ip:{client[0] if client else 'unknown'}", "anonymous")
        token = bearer(scope)
        if token is None:
            raise RouterError(401, "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
        digest = hash_key(token)
        if self.master_hash is not None and hmac.compare_digest(digest, self.master_hash):
            return Client("key:master", "master", admin=True)
        key = self.keys.get(digest)
        if key is None:
            raise RouterError(401, "Incorrect API key provided.", code="invalid_api_key")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise RouterError(401, f"The API key '{key.name}' has expired.", code="invalid_api_key")
        return Client(f"key:{key.name}", key.name, key)

    def is_admin(self, scope: Scope) -> bool:
        token = bearer(scope)
        return (token is not None and self.master_hash is not None
                and hmac.compare_digest(hash_key(token), self.master_hash))


def check_model(client: Client, model: str) -> None:
    allowed = client.key.models if client.key is not None else None
    if allowed is not None and model not in allowed:
        raise RouterError(403, f"The API key '{client.label}' may not use the model '{model}'.",
                          code="model_not_allowed", param="model")
