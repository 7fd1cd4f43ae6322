"""The storage interface (`RegistryStore`) and the SQL both databases share: model groups and deployments,
aliases, agents, keys and agent tokens; validated writes; `load` -> `Snapshot` in one read transaction.

SQL here is written once, in the dialect SQLite and Postgres agree on (Postgres's connection adapter turns
`?` into its placeholders and `BEGIN IMMEDIATE` into a transaction holding the registry's write lock);
`router.registry.sqlite` and `router.registry.postgres` hold what differs: connecting, migrations, the
change version and the few statements that are not portable.
"""

from __future__ import annotations

import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import orjson

from router.registry.model import (
    AGENT_TOKEN_PREFIX,
    DEPLOYMENT_FIELDS,
    KEY_PREFIX,
    MAX_TOKENS_PARAMS,
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
    validate_deployment,
    validate_fallback_graph,
    validate_fallbacks,
    validate_group_name,
    validate_strategy,
)


class RegistryUnavailable(Exception):
    """The registry cannot be used now (not open, or its database is unreachable)."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the store needs of a connection: sqlite3's, or the Postgres adapter."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def close(self) -> None: ...


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
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



class ChangeListener(Protocol):
    """How a router learns of other connections' changes without polling the whole registry (Postgres)."""

    def open(self) -> None: ...

    def wait(self, timeout: float, own: Connection | None) -> Hashable:
        """Wait up to `timeout` seconds for another connection's change (not `own`'s); the data version."""
        ...

    def close(self) -> None: ...


class RegistryStore(ABC):
    """The storage interface: opens the database (migrating it), reads and writes it. Every method takes a
    connection from `connect`; the statements here are the ones both databases accept (Postgres through its
    connection adapter); each implementation adds what differs."""

    #: the driver's errors for a write refused by a constraint
    integrity_errors: tuple[type[Exception], ...] = ()
    #: the driver's errors that mean "the database cannot be used now" (locked, down, gone)
    unavailable_errors: tuple[type[Exception], ...] = (RegistryUnavailable,)
    #: every error of the driver
    database_errors: tuple[type[Exception], ...] = (RegistryUnavailable,)

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the registry is, for messages (never a password)."""

    @abstractmethod
    def connect(self, busy_timeout: float = 10.0) -> Connection:
        """An open, migrated connection whose writes wait up to `busy_timeout` seconds for another writer."""

    @abstractmethod
    def data_version(self, conn: Connection) -> Hashable:
        """A value that changes when another connection commits a change (`reload` compares it)."""

    @abstractmethod
    def delete_dead_agents(self, conn: Connection, heard_before: float,
                           names: Sequence[str] | None = None) -> list[str]:
        """Delete the agents (among `names`, when given: those the caller knows to be dead, heartbeats living
        in memory and Redis) whose stored heartbeat or registration is older than `heard_before`; their names."""

    def is_busy(self, exc: BaseException) -> bool:
        """Whether a failure is another writer's lock (retry soon) rather than the database being unavailable."""
        return "locked" in str(exc) or "busy" in str(exc)

    def agents_only(self, old: Hashable, new: Hashable) -> bool:
        """Whether going from version `old` to `new` changed only agents (then only they are read again)."""
        return False

    def listener(self) -> ChangeListener | None:
        """A listener for changes, when the database can push them (None: poll `data_version`)."""
        return None

    def load_agents(self, conn: Connection) -> list[AgentEntry]:
        return [self._agent(row) for row in conn.execute(f"SELECT {self._AGENT_COLUMNS} FROM agents ORDER BY name")]

    # -- reads -------------------------------------------------------------

    _DEPLOYMENT_COLUMNS = ("id, model_group, name, type, endpoint, kind, upstream_model, key_env, input_price, "
                           "output_price, context_window, weight, rpm, tpm, timeout, enabled, max_tokens_param, "
                           "created_at, updated_at, max_parallel, connect_timeout, first_token_timeout, "
                           "idle_timeout")
    _GROUP_COLUMNS = "name, strategy, rpm, tpm, created_at, updated_at, fallbacks, content_policy_fallbacks"

    def load(self, conn: Connection) -> Snapshot:
        """The whole registry, read in one transaction (a consistent snapshot)."""
        conn.execute("BEGIN")
        try:
            return Snapshot(self.load_groups(conn), self.load_deployments(conn), self.load_aliases(conn),
                            self.load_agents(conn),
                            self.load_keys(conn), self.load_agent_tokens(conn))
        finally:
            conn.execute("COMMIT")

    _AGENT_COLUMNS = "name, endpoint, models, registered_at, last_heartbeat, token_name"

    @staticmethod
    def _group(row: tuple[Any, ...]) -> GroupEntry:
        name, strategy, rpm, tpm, created, updated, fallbacks, content_policy = row
        return GroupEntry(name, strategy, rpm, tpm, created, updated,
                          tuple(orjson.loads(fallbacks)) if fallbacks else (), bool(content_policy))

    def load_groups(self, conn: Connection) -> list[GroupEntry]:
        return [self._group(row) for row in conn.execute(
            f"SELECT {self._GROUP_COLUMNS} FROM model_groups ORDER BY name")]

    def load_deployments(self, conn: Connection, group: str | None = None) -> list[DeploymentEntry]:
        where, args = ("WHERE model_group = ?", (group,)) if group is not None else ("", ())
        rows = conn.execute(f"SELECT {self._DEPLOYMENT_COLUMNS} FROM deployments {where} ORDER BY model_group, id",
                            args)
        return [DeploymentEntry(id, group_, name, type, endpoint, kind, upstream, key_env, inp, outp, ctx, weight,
                                rpm, tpm, timeout, bool(enabled), param, created, updated, parallel, connect, first,
                                idle)
                for (id, group_, name, type, endpoint, kind, upstream, key_env, inp, outp, ctx, weight, rpm, tpm,
                     timeout, enabled, param, created, updated, parallel, connect, first, idle) in rows]

    @staticmethod
    def load_aliases(conn: Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT alias, model_group FROM aliases ORDER BY alias").fetchall())

    @staticmethod
    def _agent(row: tuple[str, str, str, float, float, str | None]) -> AgentEntry:
        name, endpoint, models_json, reg, hb, token_name = row
        return AgentEntry(name, endpoint, tuple(orjson.loads(models_json)), reg, hb, token_name)

    def load_agent(self, conn: Connection, name: str) -> AgentEntry | None:
        row = conn.execute(f"SELECT {self._AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        return self._agent(row) if row is not None else None

    def load_agent_tokens(self, conn: Connection) -> list[AgentToken]:
        return [
            AgentToken(name, token_hash, prefix, frozenset(orjson.loads(models)) if models is not None else None,
                       created, revoked)
            for name, token_hash, prefix, models, created, revoked in conn.execute(
                "SELECT name, token_hash, token_prefix, models, created_at, revoked_at FROM agent_tokens ORDER BY name")
        ]

    def load_keys(self, conn: Connection) -> list[ClientKey]:
        return [
            ClientKey(name, key_hash, prefix, rpm, tpm,
                      frozenset(orjson.loads(models)) if models is not None else None, expires, created, revoked,
                      budget, period, start, bool(content) if content is not None else None)
            for name, key_hash, prefix, rpm, tpm, models, expires, created, revoked, budget, period, start, content
            in conn.execute(
                "SELECT name, key_hash, key_prefix, rpm, tpm, models, expires_at, created_at, revoked_at, budget, "
                "budget_period, budget_start, log_content FROM client_keys ORDER BY name")
        ]

    # -- groups and deployments: primitives (the caller holds a transaction) -----------------------

    def group(self, conn: Connection, name: str) -> GroupEntry | None:
        row = conn.execute(f"SELECT {self._GROUP_COLUMNS} FROM model_groups WHERE name = ?", (name,)).fetchone()
        return self._group(row) if row is not None else None

    def put_group(self, conn: Connection, name: str, strategy: str | None, rpm: int | None,
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

    @staticmethod
    def put_fallbacks(conn: Connection, name: str, fallbacks: Sequence[str], content_policy: bool,
                      now: float) -> None:
        """Set an existing group's fallbacks (checked as a whole by `check_fallbacks`, at the end of the
        transaction: a file may name a group it adds later)."""
        conn.execute("UPDATE model_groups SET fallbacks = ?, content_policy_fallbacks = ?, updated_at = ? "
                     "WHERE name = ?", (orjson.dumps(list(fallbacks)).decode() if fallbacks else None,
                                        bool(content_policy), now, name))

    def fallback_graph(self, conn: Connection) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
        """Every group's fallbacks, and the aliases (alias -> group) they may name."""
        return {g.name: g.fallbacks for g in self.load_groups(conn)}, self.load_aliases(conn)

    def check_fallbacks(self, conn: Connection) -> None:
        """RegistryError unless every stored fallback names a group or alias, not its own group, once, and no
        chain of fallbacks loops (validate_fallback_graph); the caller's transaction then writes nothing."""
        validate_fallback_graph(*self.fallback_graph(conn))

    def put_deployment(self, conn: Connection, group: str, values: Mapping[str, Any], now: float,
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
        except self.integrity_errors as exc:
            what = (f"a deployment named {values['name']!r}" if "name" in str(exc) and "endpoint" not in str(exc)
                    else f"the deployment {values['type']} at {values['endpoint']} (upstream model "
                         f"{values['upstream_model'] or group!r})")
            raise RegistryError(f"model {group!r}: {what} already exists") from None

    @staticmethod
    def delete_deployment(conn: Connection, id: int) -> None:
        conn.execute("DELETE FROM deployments WHERE id = ?", (id,))

    @staticmethod
    def delete_group(conn: Connection, name: str) -> bool:
        conn.execute("DELETE FROM aliases WHERE model_group = ?", (name,))
        conn.execute("DELETE FROM deployments WHERE model_group = ?", (name,))
        return conn.execute("DELETE FROM model_groups WHERE name = ?", (name,)).rowcount > 0

    @staticmethod
    def put_alias(conn: Connection, alias: str, group: str) -> None:
        alias = validate_group_name(alias, "alias")
        if conn.execute("SELECT 1 FROM model_groups WHERE name = ?", (alias,)).fetchone():
            raise RegistryError(f"{alias!r} is a model name; an alias must not shadow a model")
        if not conn.execute("SELECT 1 FROM model_groups WHERE name = ?", (group,)).fetchone():
            raise RegistryError(f"model {group!r} is not in the registry")
        conn.execute("INSERT INTO aliases (alias, model_group) VALUES (?, ?) ON CONFLICT(alias) DO UPDATE "
                     "SET model_group = excluded.model_group", (alias, group))

    @staticmethod
    def delete_alias(conn: Connection, alias: str) -> bool:
        return conn.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount > 0

    # -- groups and deployments: commands (each one transaction) ----------------------------------

    def add_deployment(self, conn: Connection, group: str, values: Mapping[str, Any],
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

    def _one_deployment(self, conn: Connection, group: str, name: str | None) -> DeploymentEntry:
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

    def update_deployment(self, conn: Connection, group: str, name: str | None,
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

    def update_group(self, conn: Connection, group: str, changes: Mapping[str, Any]) -> GroupEntry:
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

    def remove_model(self, conn: Connection, name: str, deployment: str | None = None) -> bool:
        """Remove the group (its deployments and aliases), or only one of its deployments (the group goes
        with its last one). False when there was nothing to remove."""
        with transaction(conn):
            if deployment is None:
                self._refuse_if_fallback(conn, name)
                return self.delete_group(conn, name)
            target = next((d for d in self.load_deployments(conn, name) if d.name == deployment), None)
            if target is None:
                return False
            self.delete_deployment(conn, target.id)
            if not self.load_deployments(conn, name):
                self._refuse_if_fallback(conn, name)
                self.delete_group(conn, name)
            return True

    def _refuse_if_fallback(self, conn: Connection, group: str, alias: str | None = None) -> None:
        """RegistryError when another group names `group` (or one of its aliases; only `alias` when given) as
        a fallback: a removal must not leave a dangling name, as with a foreign key."""
        fallbacks, aliases = self.fallback_graph(conn)
        names = [alias] if alias is not None else [group, *(a for a, g in aliases.items() if g == group)]
        referrers = fallback_referrers(names, fallbacks, exclude=group)
        if referrers:
            what = f"alias {alias!r}" if alias is not None else f"model {group!r}"
            raise RegistryError(f"{what} is a fallback of {', '.join(map(repr, referrers))}; change "
                                f"{'its' if len(referrers) == 1 else 'their'} fallbacks first (router set-fallbacks)")

    def set_fallbacks(self, conn: Connection, group: str, fallbacks: Sequence[str] | None,
                      content_policy: bool | None = None) -> list[str]:
        """Set a group's fallbacks (None: unchanged; empty: none) and whether content-policy refusals go to
        them (None: unchanged), all checked; the chain a request for the group may now follow."""
        names = validate_fallbacks(list(fallbacks)) if fallbacks is not None else None
        with transaction(conn):
            old = self.group(conn, group)
            if old is None:
                raise RegistryError(f"model {group!r} is not in the registry")
            self.put_fallbacks(conn, group, old.fallbacks if names is None else names,
                               old.content_policy_fallbacks if content_policy is None else content_policy,
                               time.time())
            graph, aliases = self.fallback_graph(conn)
            validate_fallback_graph(graph, aliases)
        return fallback_chain(group, graph, aliases)

    def add_alias(self, conn: Connection, alias: str, group: str) -> None:
        with transaction(conn):
            self.put_alias(conn, alias, group)
            self.check_fallbacks(conn)  # an alias moved to another group must not make a fallback loop

    def remove_alias(self, conn: Connection, alias: str) -> bool:
        with transaction(conn):
            group = self.load_aliases(conn).get(alias)
            if group is not None:
                self._refuse_if_fallback(conn, group, alias)
            return self.delete_alias(conn, alias)

    def set_model_limits(self, conn: Connection, name: str, rpm: int | None, tpm: int | None) -> bool:
        """The group's own limits, across all clients (0 or None: none)."""
        try:
            self.update_group(conn, name, {"rpm": rpm, "tpm": tpm})
        except RegistryError:
            if self.group(conn, name) is None:
                return False
            raise
        return True

    def set_max_tokens_param(self, conn: Connection, name: str, param: str | None) -> bool:
        """Which field carries the output-token limit upstream, for every deployment of the group
        (None: the provider's default)."""
        if param not in (None, *MAX_TOKENS_PARAMS):
            raise RegistryError("--max-tokens-param must be max_tokens, max_completion_tokens or default")
        return conn.execute("UPDATE deployments SET max_tokens_param = ?, updated_at = ? WHERE model_group = ?",
                            (param, time.time(), name)).rowcount > 0

    # -- client keys ----------------------------------------------------------------

    def create_key(self, conn: Connection, name: str | None, rpm: int | None, tpm: int | None,
                   models: list[str] | None, expires_at: float | None, budget: float | None = None,
                   budget_period: float | None = None, log_content: bool | None = None) -> tuple[str, ClientKey]:
        """A new key: the secret is returned once; only its hash is stored."""
        for value, what in ((rpm, "rpm"), (tpm, "tpm")):
            if value is not None and value < 1:
                raise RegistryError(f"{what} must be a positive number")
        _check_budget(budget, budget_period)
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
        start = now if budget is not None else None
        try:
            conn.execute(
                "INSERT INTO client_keys (name, key_hash, key_prefix, rpm, tpm, models, expires_at, created_at, "
                "budget, budget_period, budget_start, log_content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, hash_key(secret), prefix, rpm, tpm,
                 orjson.dumps(sorted(set(models))).decode() if models is not None else None, expires_at, now,
                 budget, budget_period if budget is not None else None, start, log_content))
        except self.integrity_errors:
            raise RegistryError(f"a key named {name!r} already exists") from None
        return secret, ClientKey(name, hash_key(secret), prefix, rpm, tpm,
                                 frozenset(models) if models is not None else None, expires_at, now, None,
                                 budget, budget_period if budget is not None else None, start, log_content)

    def set_key_budget(self, conn: Connection, name_or_prefix: str, budget: float | None,
                       budget_period: float | None) -> int:
        """Set (or, with budget None, clear) a key's budget; its period starts again now."""
        _check_budget(budget, budget_period)
        return conn.execute(
            "UPDATE client_keys SET budget = ?, budget_period = ?, budget_start = ? WHERE revoked_at IS NULL AND "
            "(name = ? OR key_prefix = ?)", (budget, budget_period if budget is not None else None,
                                            time.time() if budget is not None else None, name_or_prefix,
                                            name_or_prefix)).rowcount

    def set_key_log_content(self, conn: Connection, name_or_prefix: str, log_content: bool | None) -> int:
        return conn.execute("UPDATE client_keys SET log_content = ? WHERE revoked_at IS NULL AND "
                            "(name = ? OR key_prefix = ?)", (log_content, name_or_prefix, name_or_prefix)).rowcount

    def revoke_key(self, conn: Connection, name_or_prefix: str) -> int:
        return conn.execute("UPDATE client_keys SET revoked_at = ? WHERE revoked_at IS NULL AND "
                            "(name = ? OR key_prefix = ?)", (time.time(), name_or_prefix, name_or_prefix)).rowcount

    def sync_models(self, conn: Connection, type: str, endpoint: str, kind: str,
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

    def register_agent(self, conn: Connection, name: str, endpoint: str, models: Sequence[str],
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

    def heartbeat(self, conn: Connection, name: str, now: float, token_name: str,
                  take_over: bool = False) -> AgentEntry | None:
        """The agent after its heartbeat; None if it is unknown; AgentNameTaken if another credential's."""
        if conn.execute("UPDATE agents SET last_heartbeat = ? WHERE name = ? AND (? OR token_name IS NULL "
                        "OR token_name = ?)", (now, name, take_over, token_name)).rowcount:
            return self.load_agent(conn, name)
        if self.load_agent(conn, name) is not None:
            raise AgentNameTaken(f"agent {name!r} is registered with another credential")
        return None

    # -- agent tokens ----------------------------------------------------------------

    def create_agent_token(self, conn: Connection, name: str,
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
        except self.integrity_errors:
            raise RegistryError(f"an agent token named {name!r} already exists") from None
        return secret, AgentToken(name, hash_key(secret), prefix,
                                  frozenset(stored) if stored is not None else None, now, None)

    def revoke_agent_token(self, conn: Connection, name_or_prefix: str) -> int:
        return conn.execute("UPDATE agent_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND "
                            "(name = ? OR token_prefix = ?)",
                            (time.time(), name_or_prefix, name_or_prefix)).rowcount


def _check_budget(budget: float | None, period: float | None) -> None:
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise RegistryError("a budget must be a positive amount of US dollars")
    if period is not None and not (period > 0 and math.isfinite(period)):
        raise RegistryError("a budget period must be a positive duration")
    if period is not None and budget is None:
        raise RegistryError("a budget period needs a budget")
