"""The declarative registry file (`router apply FILE`, `router export`): parse and validate it, diff it
against the registry (groups, deployments, aliases; agents are not part of it), and write the difference
in one transaction. Deployments are matched by name; one without a name gets the default
`{type}-{host}` name (made unique within the file's group), as `add-model` would give it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from router.registry import (
    Connection,
    DEPLOYMENT_DEFAULTS,
    DEPLOYMENT_FIELDS,
    DeploymentEntry,
    RegistryError,
    RegistryStore,
    Snapshot,
    default_deployment_name,
    group_limits,
    transaction,
    validate_deployment,
    validate_fallback_graph,
    validate_fallbacks,
    validate_group_name,
    validate_strategy,
)

GROUP_KEYS = ("strategy", "rpm", "tpm", "fallbacks", "content_policy_fallbacks", "aliases", "deployments")
GROUP_FIELDS = ("strategy", "rpm", "tpm", "fallbacks", "content_policy_fallbacks")  # compared with the registry


@dataclass
class GroupSpec:
    strategy: str | None
    rpm: int | None
    tpm: int | None
    aliases: list[str]
    deployments: dict[str, dict[str, Any]]  # name -> validated fields (validate_deployment, key_env not checked)
    fallbacks: tuple[str, ...] = ()  # as written: names of groups or aliases of this file
    content_policy_fallbacks: bool = False


def parse(text: str, source: str = "file") -> dict[str, GroupSpec]:
    """The file's groups, every field checked; RegistryError (one line, naming where) otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RegistryError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {"models": {}}
    if not isinstance(data, dict) or set(data) - {"models"}:
        raise RegistryError(f"{source} must be a mapping with one key, 'models'")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise RegistryError(f"{source}: 'models' must map model names to their settings")
    specs: dict[str, GroupSpec] = {}
    for raw_name, raw in models.items():
        name = validate_group_name(str(raw_name) if raw_name is not None else "")
        where = f"{source}: model {name!r}"
        if not isinstance(raw, dict):
            raise RegistryError(f"{where} must be a mapping with 'deployments'")
        unknown = set(raw) - set(GROUP_KEYS)
        if unknown:
            raise RegistryError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                f"valid: {', '.join(GROUP_KEYS)}")
        try:
            strategy = validate_strategy(raw.get("strategy"))
            rpm, tpm = group_limits(raw.get("rpm"), raw.get("tpm"))
            fallbacks = validate_fallbacks(raw.get("fallbacks"))
            content_policy = raw.get("content_policy_fallbacks", False)
            if not isinstance(content_policy, bool):
                raise RegistryError(f"content_policy_fallbacks must be true or false, got {content_policy!r}")
            aliases = raw.get("aliases") or []
            if not isinstance(aliases, list):
                raise RegistryError("aliases must be a list of names")
            aliases = sorted({validate_group_name(a, "alias") for a in aliases if isinstance(a, str)}
                             | {"" for a in aliases if not isinstance(a, str)})
            if "" in aliases:
                raise RegistryError("aliases must be a list of names")
            items = raw.get("deployments")
            if not isinstance(items, list) or not items:
                raise RegistryError("needs a non-empty list 'deployments'")
            deployments: dict[str, dict[str, Any]] = {}
            for i, item in enumerate(items, 1):
                if not isinstance(item, dict):
                    raise RegistryError(f"deployment {i} must be a mapping")
                d = validate_deployment(name, item, check_env=False)
                if item.get("name") is None:
                    d["name"] = default_deployment_name(d["type"], d["endpoint"], deployments)
                if d["name"] in deployments:
                    raise RegistryError(f"two deployments named {d['name']!r}")
                target = (d["type"], d["endpoint"], d["upstream_model"])
                if any((o["type"], o["endpoint"], o["upstream_model"]) == target for o in deployments.values()):
                    raise RegistryError(f"two deployments of {d['type']} at {d['endpoint']} serving "
                                        f"{d['upstream_model'] or name!r}")
                deployments[d["name"]] = d
        except RegistryError as exc:
            raise RegistryError(f"{where}: {exc}") from None
        specs[name] = GroupSpec(strategy, rpm, tpm, aliases, deployments, fallbacks, content_policy)
    owners: dict[str, str] = {}
    for name, spec in specs.items():
        for alias in spec.aliases:
            if alias in specs:
                raise RegistryError(f"{source}: alias {alias!r} of {name!r} is also a model name")
            if alias in owners:
                raise RegistryError(f"{source}: alias {alias!r} is given to {owners[alias]!r} and {name!r}")
            owners[alias] = name
    try:  # once the whole file is read: a fallback may name a group defined further down
        validate_fallback_graph({name: spec.fallbacks for name, spec in specs.items()}, owners)
    except RegistryError as exc:
        raise RegistryError(f"{source}: {exc}") from None
    return specs


@dataclass
class Plan:
    """What applying a file changes: one line per change, and the writes that make it."""

    lines: list[str] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    removed: int = 0
    _writes: list[Any] = field(default_factory=list, repr=False)

    @property
    def empty(self) -> bool:
        return not self.lines

    def summary(self) -> str:
        return f"{self.added} added, {self.changed} changed, {self.removed} removed"

    def write(self, store: RegistryStore, conn: Connection) -> None:
        now = time.time()
        with transaction(conn):
            for fn in self._writes:
                fn(store, conn, now)
            store.check_fallbacks(conn)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return f"[{', '.join(value)}]" if value else "-"
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def plan(specs: dict[str, GroupSpec], snap: Snapshot) -> Plan:
    """The difference between the registry `snap` and the file's `specs`, removals first."""
    p = Plan()
    groups = {g.name: g for g in snap.groups}
    current: dict[str, dict[str, DeploymentEntry]] = {}
    for d in snap.deployments:
        current.setdefault(d.group, {})[d.name] = d
    removals: list[Any] = []
    additions: list[Any] = []
    fallbacks: list[Any] = []  # last: they may name groups and aliases added before them
    for alias, group in sorted(snap.aliases.items()):
        target = next((n for n, s in specs.items() if alias in s.aliases), None)
        if target != group:
            p.lines.append(f"- alias {alias} -> {group}")
            p.removed += 1
            removals.append(lambda st, c, now, a=alias: st.delete_alias(c, a))
    for name in sorted(groups):
        if name not in specs:
            p.lines.append(f"- model {name} ({len(current.get(name, {}))} deployments)")
            p.removed += 1
            removals.append(lambda st, c, now, n=name: st.delete_group(c, n))
            continue
        for dname, old in current.get(name, {}).items():
            if dname not in specs[name].deployments:
                p.lines.append(f"- deployment {name}/{dname}")
                p.removed += 1
                removals.append(lambda st, c, now, i=old.id: st.delete_deployment(c, i))
    for name, spec in specs.items():
        old_group = groups.get(name)
        diffs = []
        if old_group is None:
            p.lines.append(f"+ model {name} (strategy {spec.strategy or 'default'}, rpm {_show(spec.rpm)}, "
                           f"tpm {_show(spec.tpm)}"
                           + (f", fallbacks {_show(spec.fallbacks)}" if spec.fallbacks else "")
                           + (", content-policy fallbacks" if spec.content_policy_fallbacks else "") + ")")
            p.added += 1
        else:
            diffs = [f"{k} {_show(getattr(old_group, k))} -> {_show(getattr(spec, k))}"
                     for k in GROUP_FIELDS if getattr(old_group, k) != getattr(spec, k)]
            if diffs:
                p.lines.append(f"~ model {name}: {', '.join(diffs)}")
                p.changed += 1
        if old_group is None or diffs:
            additions.append(lambda st, c, now, n=name, s=spec: st.put_group(c, n, s.strategy, s.rpm, s.tpm, now))
        had = (old_group.fallbacks, old_group.content_policy_fallbacks) if old_group is not None else ((), False)
        if had != (spec.fallbacks, spec.content_policy_fallbacks):
            fallbacks.append(lambda st, c, now, n=name, s=spec: st.put_fallbacks(
                c, n, s.fallbacks, s.content_policy_fallbacks, now))
        for dname, want in spec.deployments.items():
            have = current.get(name, {}).get(dname)
            if have is None:
                p.lines.append(f"+ deployment {name}/{dname} ({want['type']} {want['endpoint']})")
                p.added += 1
                additions.append(lambda st, c, now, n=name, w=want: st.put_deployment(c, n, _checked(n, w, None),
                                                                                      now))
                continue
            fields = have.values()
            diffs = [f"{k} {_show(fields[k])} -> {_show(want[k])}" for k in DEPLOYMENT_FIELDS
                     if fields[k] != want[k]]
            if diffs:
                p.lines.append(f"~ deployment {name}/{dname}: {', '.join(diffs)}")
                p.changed += 1
                additions.append(lambda st, c, now, n=name, w=want, h=have: st.put_deployment(
                    c, n, _checked(n, w, h), now, id=h.id))
        for alias in spec.aliases:
            if snap.aliases.get(alias) != name:
                p.lines.append(f"+ alias {alias} -> {name}")
                p.added += 1
                additions.append(lambda st, c, now, a=alias, n=name: st.put_alias(c, a, n))
    p._writes = removals + additions + fallbacks
    return p


def _checked(group: str, want: dict[str, Any], have: DeploymentEntry | None) -> dict[str, Any]:
    """The deployment as written: a key variable it newly names must be set now."""
    if want["key_env"] is not None and (have is None or have.key_env != want["key_env"]):
        return validate_deployment(group, want, check_env=True)
    return want


def export(snap: Snapshot) -> str:
    """The registry's groups, deployments and aliases in the apply format (fields at their default left out)."""
    aliases, deployments = snap.by_group()
    models: dict[str, Any] = {}
    for g in snap.groups:
        entry: dict[str, Any] = {k: getattr(g, k) for k in ("strategy", "rpm", "tpm") if getattr(g, k) is not None}
        if g.fallbacks:
            entry["fallbacks"] = list(g.fallbacks)
        if g.content_policy_fallbacks:
            entry["content_policy_fallbacks"] = True
        if g.name in aliases:
            entry["aliases"] = sorted(aliases[g.name])
        entry["deployments"] = [
            {k: v for k, v in d.values().items()
             if k in ("name", "type", "endpoint", "kind") or v != DEPLOYMENT_DEFAULTS[k]}
            for d in deployments.get(g.name, [])]
        models[g.name] = entry
    return yaml.safe_dump({"models": models}, sort_keys=False, allow_unicode=True, default_flow_style=False)
