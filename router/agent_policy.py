"""Who may announce agents, where they may point the router, and which model names they may take.

- Credentials (`AgentCredentials.identify`): the master key, `ROUTER_AGENT_TOKEN` (named "shared"), or a
  per-agent token from `router create-agent-token` (its SHA-256 is looked up in the snapshot). With none
  configured at all, loopback clients may register as "loopback"; nobody else may.
- Addresses (`check_address`, `check_endpoint`): no link-local, cloud-metadata, unspecified, multicast or
  broadcast address, for the client and for every address the endpoint's host resolves to (resolved off the
  event loop); inside `ROUTER_AGENT_NETWORKS` when it is set. No user:password in endpoint URLs.
- Names (`hosted_names`): a name a hosted provider's prefix rule serves (gpt-, claude, ...) needs
  `ROUTER_AGENT_ALLOWED_MODELS`, the token's `--models`, or a registry entry of type `local`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from router.config import Settings
from router.errors import RouterError
from router.registry import AgentToken, hash_key
from router.routing import PREFIX_RULES

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))
BROADCAST = ipaddress.IPv4Address("255.255.255.255")
RESOLVE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Credential:
    name: str  # the name agents registered with it are bound to
    models: frozenset[str] | None  # hosted-provider names it may announce; None: any
    admin: bool = False  # the master key: may also take over any agent name


def parse_networks(text: str | None) -> tuple[IPNetwork, ...] | None:
    """ROUTER_AGENT_NETWORKS as networks; None when unset."""
    if text is None:
        return None
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"ROUTER_AGENT_NETWORKS: {exc}") from None


def parse_allowed(text: str | None) -> frozenset[str] | None:
    """ROUTER_AGENT_ALLOWED_MODELS: None means `*` (any name); empty means none."""
    names = frozenset(part.strip() for part in (text or "").split(",") if part.strip())
    return None if "*" in names else names


def ip_of(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str | None) -> bool:
    address = ip_of(host) if host else None
    return address is not None and address.is_loopback


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an agent may not be at (or register from) this address; None if it may."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address == BROADCAST:
        return "broadcast"
    return None


class AgentPolicy:
    def __init__(self, settings: Settings) -> None:
        shared = settings.router_agent_token
        master = settings.router_master_key
        self.shared = shared.get_secret_value().encode() if shared is not None else None
        self.master_hash = hash_key(master.get_secret_value()) if master is not None else None
        self.networks = parse_networks(settings.router_agent_networks)
        self.allowed = parse_allowed(settings.router_agent_allowed_models)
        self.tokens: dict[str, AgentToken] = {}  # token hash -> active token
        self.tokens_exist = False  # any token ever created (revoked ones included): registration stays closed

    def replace_tokens(self, tokens: Iterable[AgentToken]) -> None:
        tokens = list(tokens)
        self.tokens = {t.token_hash: t for t in tokens if t.revoked_at is None}
        self.tokens_exist = bool(tokens)

    @property
    def open_to_loopback(self) -> bool:
        return self.shared is None and not self.tokens_exist

    def describe(self) -> str:
        """The startup log line."""
        if self.open_to_loopback:
            return ("agent registration: no ROUTER_AGENT_TOKEN and no agent tokens configured, so only loopback "
                    "clients may register agents (issue tokens with `router create-agent-token NAME`)")
        return (f"agent registration needs a credential ({len(self.tokens)} agent tokens"
                f"{', ROUTER_AGENT_TOKEN' if self.shared is not None else ''})")

    # -- who -----------------------------------------------------------------------

    def identify(self, token: str | None, client_host: str | None) -> Credential:
        """The credential a request carries; 401 without a valid one."""
        if token is not None:
            digest = hash_key(token)
            if self.master_hash is not None and hmac.compare_digest(digest, self.master_hash):
                return Credential("master", None, admin=True)
            if self.shared is not None and hmac.compare_digest(token.encode(), self.shared):
                return Credential("shared", self.allowed)
            found = self.tokens.get(digest)
            if found is not None:
                extra = found.models or frozenset()
                return Credential(found.name, None if self.allowed is None else self.allowed | extra)
            raise RouterError(401, "Invalid agent token.", code="invalid_api_key")
        if self.open_to_loopback:
            if is_loopback(client_host):
                return Credential("loopback", self.allowed)
            raise RouterError(401, "Agent registration is open only to loopback clients until a credential is "
                              "configured: issue a token with `router create-agent-token NAME` (or set "
                              "ROUTER_AGENT_TOKEN) and send it as 'Authorization: Bearer <token>'.",
                              code="invalid_api_key")
        raise RouterError(401, "An agent token is required: send 'Authorization: Bearer <token>' "
                          "(`router create-agent-token NAME` issues one).", code="invalid_api_key")

    # -- where ---------------------------------------------------------------------

    def check_client(self, client_host: str | None) -> None:
        address = ip_of(client_host) if client_host else None
        if address is None:
            if self.networks is not None:
                raise RouterError(403, "Agents must register from an address inside ROUTER_AGENT_NETWORKS.",
                                  code="agent_network_not_allowed")
            return
        reason = forbidden_reason(address)
        if reason is not None:
            raise RouterError(403, f"Agents may not register from a {reason} address.",
                              code="agent_network_not_allowed")
        if self.networks is not None and not any(address in net for net in self.networks):
            raise RouterError(403, f"Agents must register from an address inside ROUTER_AGENT_NETWORKS; "
                              f"{address} is not.", code="agent_network_not_allowed")

    async def check_endpoint(self, endpoint: str) -> None:
        """Refuse (422) an endpoint whose URL or any resolved address an agent may not use."""
        parts = urlsplit(endpoint)  # validate_url has checked it parses, with an http(s) scheme and a host
        if parts.username is not None or parts.password is not None:
            raise bad_endpoint("'endpoint' must not contain credentials (user:password@).")
        host = (parts.hostname or "").rstrip(".").lower()
        if host in METADATA_HOSTS:
            raise bad_endpoint(f"'endpoint' host {host!r} is a cloud metadata service.")
        address = ip_of(host)
        addresses = [address] if address is not None else await resolve(host, parts.port)
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                raise bad_endpoint(f"'endpoint' host {host!r} is {reason} ({address}); agents may not be there.")
            if self.networks is not None and not any(address in net for net in self.networks):
                raise bad_endpoint(f"'endpoint' host {host!r} ({address}) is outside ROUTER_AGENT_NETWORKS.")

    # -- which names -----------------------------------------------------------------

    def hosted_names(self, credential: Credential, models: Iterable[str], local_entries: Iterable[str]) -> list[str]:
        """The announced names a hosted provider would serve and this credential may not take."""
        if credential.admin or credential.models is None:
            return []
        local = set(local_entries)
        return [m for m in models
                if m not in credential.models and m not in local and hosted_provider(m) is not None]


def hosted_provider(model: str) -> str | None:
    """The provider type of the first prefix rule that matches, unless it is `local`."""
    for prefix, type_ in PREFIX_RULES:
        if model.startswith(prefix):
            return None if type_ == "local" else type_
    return None


async def resolve(host: str, port: int | None) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port or 80, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except (TimeoutError, OSError, UnicodeError):
        raise bad_endpoint(f"'endpoint' host {host!r} cannot be resolved.") from None
    addresses = [a for a in (ip_of(str(info[4][0])) for info in infos) if a is not None]
    if not addresses:
        raise bad_endpoint(f"'endpoint' host {host!r} cannot be resolved.")
    return addresses


def bad_endpoint(message: str) -> RouterError:
    return RouterError(422, message, param="endpoint", code="invalid_value")
