"""Command line: `router serve` and the registry commands.

Run as `python -m router.cli COMMAND` or through the `router` console script.
Every failure prints one line to stderr and exits non-zero (`registry()` turns
database errors, a lock included, into that line); a failed command leaves the
database as it was.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table

from router.config import ConfigError, Settings, load_settings
from router.errors import Scrubber
from router.registry import (Connection, DeploymentEntry, RegistryError, RegistryStore, open_store, transaction,
                             validate_url)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LLM router: serve the OpenAI-compatible endpoint and manage the model registry.")
# Piped output (scripts, grep) gets whole cells instead of wrapping at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc))


def store(s: Settings) -> RegistryStore:
    """The configured registry: Postgres (DATABASE_URL) or the SQLite file (SQLITE_DB_PATH)."""
    return open_store(s)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


CLI_BUSY_TIMEOUT = 5.0  # seconds a command waits for another writer's lock


@contextmanager
def registry(s: Settings) -> Iterator[tuple[RegistryStore, Connection]]:
    """The open registry (SQLite or Postgres); any database or input error in the block becomes one line on
    stderr and exit 1."""
    registry_store = store(s)
    where = registry_store.location
    try:
        conn = registry_store.connect(busy_timeout=CLI_BUSY_TIMEOUT)
        try:
            yield registry_store, conn
        finally:
            conn.close()
    except RegistryError as exc:
        fail(str(exc))
    except registry_store.unavailable_errors as exc:
        if registry_store.is_busy(exc):
            fail(f"registry {where} is locked by another process; try again ({one_line(exc)})")
        fail(f"cannot use registry {where}: {one_line(exc)}")
    except registry_store.database_errors + (OSError,) as exc:
        fail(f"cannot use registry {where}: {exc.__class__.__name__}: {one_line(exc)}")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to bind (default ROUTER_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default ROUTER_PORT or 8000)."),
    workers: int | None = typer.Option(None, help="Worker processes sharing the registry (default 1)."),
) -> None:
    """Serve the router."""
    s = settings()
    workers = workers or s.router_workers
    try:
        store(s).connect().close()  # create and migrate the registry once, before workers start
    except Exception as exc:  # noqa: BLE001
        fail(f"cannot open registry {store(s).location}: {one_line(exc)}")
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="router-metrics-")
    if s.router_instance_id is None:  # one id for every worker of this server: a loop is caught at its first pass
        os.environ["ROUTER_INSTANCE_ID"] = secrets.token_hex(6)
    from router.server import RouterHttpProtocol
    from router.shutdown import serve as run_server, uvicorn_grace

    run_server(  # uvicorn.run, draining on SIGTERM (router/shutdown.py)
        "router.app:create_app", factory=True,
        host=host or s.router_host, port=port or s.router_port, workers=workers,
        # httptools with deadlines for request heads and bodies (REQUEST_HEADER_TIMEOUT, REQUEST_BODY_TIMEOUT)
        loop="uvloop", http=RouterHttpProtocol, access_log=False, log_level=s.log_level.lower(),
        # uvicorn answers 503 to a request while open connections (idle kept-alive ones included) or
        # running requests reach limit_concurrency: so N connections are served and the N+1th is refused
        limit_concurrency=s.router_max_connections + 1,
        # the client address (rate limits of key-less clients) comes from X-Forwarded-For only when the
        # request came through a trusted proxy; off by default, which also keeps that work off the hot path
        proxy_headers=s.router_trusted_proxies is not None,
        forwarded_allow_ips=s.router_trusted_proxies or "127.0.0.1",
        # in-flight requests get SHUTDOWN_GRACE_PERIOD after SHUTDOWN_DELAY; router.shutdown cuts them at its end,
        # uvicorn's own deadline is a backstop just after
        timeout_graceful_shutdown=uvicorn_grace(s.shutdown_grace_period),
    )


@app.command()
def migrate(
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for the database to accept "
                               "connections (a Kubernetes hook starting next to Postgres)."),
) -> None:
    """Create or upgrade the registry's schema (the SQLite file, or DATABASE_URL's Postgres) and exit."""
    s = settings()
    reg = store(s)
    deadline = time.monotonic() + wait
    while True:
        try:
            reg.connect().close()
            break
        except RegistryError as exc:
            fail(str(exc))
        except reg.unavailable_errors + (OSError,) as exc:  # not reachable (yet): wait, then fail loudly
            if time.monotonic() >= deadline:
                fail(f"cannot reach registry {reg.location}"
                     + (f" within {wait:g}s" if wait else "") + f": {one_line(exc)}")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except reg.database_errors as exc:
            fail(f"cannot migrate registry {reg.location}: {exc.__class__.__name__}: {one_line(exc)}")
    out.print(f"registry {reg.location}: schema up to date")


KIND_HELP = ("api or weight. api: a provider's hosted API (their hardware, billed per token); weight: weights "
             "you run (a Local Agent, llm-d, this process). Hosted API types (openai, anthropic, google, "
             "openrouter, grok, groq, venice) are api, huggingface is weight; local, llm-d and dummy take either.")


def deployment_options(name: str | None, upstream_model: str | None, key_env: str | None,
                       input_price: float | None, output_price: float | None, context_window: int | None,
                       weight: float | None, rpm: int | None, tpm: int | None, timeout: float | None,
                       max_tokens_param: str | None, max_parallel: int | None = None,
                       timeouts: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The deployment fields given on the command line (None: not given); `timeouts`: connect_timeout,
    first_token_timeout, idle_timeout."""
    given = {"name": name, "upstream_model": upstream_model, "key_env": key_env, "input_price": input_price,
             "output_price": output_price, "context_window": context_window, "weight": weight, "rpm": rpm,
             "tpm": tpm, "timeout": timeout, "max_tokens_param": max_tokens_param, "max_parallel": max_parallel}
    values: dict[str, Any] = {k: v for k, v in {**given, **(timeouts or {})}.items() if v is not None}
    if values.get("max_tokens_param") == "default":
        values["max_tokens_param"] = None
    if values.get("max_parallel") == 0:  # back to the type's default
        values["max_parallel"] = None
    return values


NAME_OPT = typer.Option(None, "--name", help="Deployment name, shown in x-router-deployment (default {type}-{host}).")
UPSTREAM_OPT = typer.Option(None, help="What the provider calls the model (default: NAME).")
KEY_ENV_OPT = typer.Option(None, help="Environment variable holding this deployment's key (must be set; the "
                           "key itself is never stored).")
INPUT_PRICE_OPT = typer.Option(None, help="USD per million input tokens (default: genai-prices', else unknown).")
OUTPUT_PRICE_OPT = typer.Option(None, help="USD per million output tokens (default: genai-prices', else unknown).")
CONTEXT_OPT = typer.Option(None, help="Context window in tokens (prompt + output).")
WEIGHT_OPT = typer.Option(None, help="Share of traffic for the weighted strategy (default 1).")
TIMEOUT_OPT = typer.Option(None, help="Seconds for a whole exchange with this deployment (default UPSTREAM_TIMEOUT).")
# resilience (issue 11): timeouts per deployment
CONNECT_TIMEOUT_OPT = typer.Option(None, help="Seconds to connect to this deployment (default "
                                   "UPSTREAM_CONNECT_TIMEOUT; 0 on update-model: back to the default).")
FIRST_TOKEN_TIMEOUT_OPT = typer.Option(None, help="Seconds to a stream's first content before the next deployment is "
                                       "tried (default UPSTREAM_FIRST_TOKEN_TIMEOUT; 0 on update-model: the default).")
IDLE_TIMEOUT_OPT = typer.Option(None, help="Seconds a stream may wait between chunks (default UPSTREAM_IDLE_TIMEOUT; "
                                "0 on update-model: the default).")
STRATEGY_OPT = typer.Option(None, help="The group's strategy: cost-latency (default), weighted, least-busy, "
                            "latency, cost, round-robin, random.")
MAX_TOKENS_OPT = typer.Option(None, help="The field its upstream reads the output-token limit from: max_tokens, "
                              "max_completion_tokens, or default (the provider's).")
MAX_PARALLEL_OPT = typer.Option(None, min=0, help="Requests it serves at once before queueing them (a local server's "
                                "batch, vLLM's --max-num-seqs; 0: the default, 1 for local, llm-d and huggingface, "
                                "unlimited for hosted APIs). Routing counts a queue only beyond it.")


@app.command("add-model")
def add_model(
    name: str = typer.Argument(..., help="Model name clients will send (the model group)."),
    type: str = typer.Argument(..., metavar="TYPE", help="Provider type (local, openai, anthropic, ...)."),
    endpoint: str = typer.Argument(..., help="Base URL of the provider, with or without /v1."),
    kind: str = typer.Argument(..., help=KIND_HELP),
    deployment: str | None = NAME_OPT,
    upstream_model: str | None = UPSTREAM_OPT,
    key_env: str | None = KEY_ENV_OPT,
    input_price: float | None = INPUT_PRICE_OPT,
    output_price: float | None = OUTPUT_PRICE_OPT,
    context_window: int | None = CONTEXT_OPT,
    weight: float | None = WEIGHT_OPT,
    rpm: int | None = typer.Option(None, help="This deployment's requests per minute (default: none)."),
    tpm: int | None = typer.Option(None, help="This deployment's tokens per minute (default: none)."),
    timeout: float | None = TIMEOUT_OPT,
    disabled: bool = typer.Option(False, "--disabled", help="Add it disabled (no traffic until --enable)."),
    strategy: str | None = STRATEGY_OPT,
    max_tokens_param: str | None = MAX_TOKENS_OPT,
    max_parallel: int | None = MAX_PARALLEL_OPT,
    connect_timeout: float | None = CONNECT_TIMEOUT_OPT,
    first_token_timeout: float | None = FIRST_TOKEN_TIMEOUT_OPT,
    idle_timeout: float | None = IDLE_TIMEOUT_OPT,
) -> None:
    """Add a model, or another deployment of it: the same NAME with a different type, endpoint or
    upstream model serves the same group."""
    timeouts = {"connect_timeout": connect_timeout, "first_token_timeout": first_token_timeout,
                "idle_timeout": idle_timeout}
    values = {"type": type, "endpoint": endpoint, "kind": kind, "enabled": not disabled,
              **deployment_options(deployment, upstream_model, key_env, input_price, output_price, context_window,
                                   weight, rpm, tpm, timeout, max_tokens_param, max_parallel, timeouts)}
    with registry(settings()) as (reg, conn):
        entry = reg.add_deployment(conn, name, values, strategy)
        count = len(reg.load_deployments(conn, entry.group))
    out.print(f"added {entry.group} ({entry.type}, {entry.kind}) -> {entry.endpoint} as deployment {entry.name}"
              + (f" (upstream model {entry.upstream_model})" if entry.upstream_model else "")
              + (f"; {entry.group} now has {count} deployments" if count > 1 else ""))


@app.command("update-model")
def update_model(
    name: str = typer.Argument(..., help="Model name (the group)."),
    deployment: str | None = typer.Option(None, help="The deployment to change (needed when the group has "
                                          "several). Without it, --rpm/--tpm are the group's limits."),
    rename: str | None = typer.Option(None, "--name", help="A new name for the deployment."),
    type: str | None = typer.Option(None, "--type", help="Provider type."),
    endpoint: str | None = typer.Option(None, help="Base URL."),
    kind: str | None = typer.Option(None, help=KIND_HELP),
    upstream_model: str | None = UPSTREAM_OPT,
    key_env: str | None = KEY_ENV_OPT,
    input_price: float | None = INPUT_PRICE_OPT,
    output_price: float | None = OUTPUT_PRICE_OPT,
    context_window: int | None = CONTEXT_OPT,
    weight: float | None = WEIGHT_OPT,
    rpm: int | None = typer.Option(None, help="Requests per minute (0: none): the deployment's with "
                                   "--deployment, else the group's, across all its deployments and clients."),
    tpm: int | None = typer.Option(None, help="Tokens per minute (0: none): the deployment's with --deployment, "
                                   "else the group's."),
    timeout: float | None = TIMEOUT_OPT,
    enable: bool | None = typer.Option(None, "--enable/--disable", help="Let the deployment take traffic or not."),
    strategy: str | None = STRATEGY_OPT,
    max_tokens_param: str | None = MAX_TOKENS_OPT,
    max_parallel: int | None = MAX_PARALLEL_OPT,
    connect_timeout: float | None = CONNECT_TIMEOUT_OPT,
    first_token_timeout: float | None = FIRST_TOKEN_TIMEOUT_OPT,
    idle_timeout: float | None = IDLE_TIMEOUT_OPT,
) -> None:
    """Change a model group (--strategy; --rpm/--tpm without --deployment) or one deployment, in place."""
    group_changes: dict[str, Any] = {"strategy": strategy} if strategy is not None else {}
    if deployment is None:
        group_changes.update({k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None})
        rpm = tpm = None
    timeouts = {"connect_timeout": connect_timeout, "first_token_timeout": first_token_timeout,
                "idle_timeout": idle_timeout}
    changes = deployment_options(rename, upstream_model, key_env, input_price, output_price, context_window,
                                 weight, rpm, tpm, timeout, max_tokens_param, max_parallel, timeouts)
    changes.update({k: None for k, v in timeouts.items() if v == 0})  # 0: back to the setting's default
    changes.update({k: v for k, v in (("type", type), ("endpoint", endpoint), ("kind", kind), ("enabled", enable))
                    if v is not None})
    if not group_changes and not changes:
        fail("nothing to change; give at least one option (see --help)")
    with registry(settings()) as (reg, conn), transaction(conn):
        # one transaction: a bad deployment option leaves the group's options unwritten too
        if group_changes:
            group = reg.update_group(conn, name, group_changes)
        if changes:
            entry = reg.update_deployment(conn, name, deployment, changes)
    if group_changes:
        out.print(f"group {name}: strategy {group.strategy or 'default (cost-latency)'}, "
                  f"{group.rpm or 'no'} requests/min, {group.tpm or 'no'} tokens/min")
    if changes:
        out.print(f"deployment {name}/{entry.name}: " + ", ".join(
            f"{k} {getattr(entry, 'name' if k == 'name' else k)}" for k in changes))


@app.command("set-model-limits")
def set_model_limits(
    name: str = typer.Argument(..., help="Model name."),
    rpm: int = typer.Option(0, help="Requests per minute for this model, across all clients (0: none)."),
    tpm: int = typer.Option(0, help="Tokens per minute for this model, across all clients (0: none)."),
) -> None:
    """Set a model group's own rate limits (across all its deployments and clients)."""
    s = settings()
    with registry(s) as (reg, conn):
        changed = reg.set_model_limits(conn, name, rpm, tpm)
    if not changed:
        fail(f"model {name!r} is not in the registry")
    out.print(f"limits of {name}: {rpm or 'no'} requests/min, {tpm or 'no'} tokens/min")


@app.command("set-model-option")
def set_model_option(
    name: str = typer.Argument(..., help="Model name."),
    max_tokens_param: str = typer.Option(..., help="The field its upstream reads the output-token limit from: "
                                         "max_tokens, max_completion_tokens, or default (the provider's)."),
) -> None:
    """Set how a model's requests are adapted for its upstream (every deployment of the group)."""
    param = None if max_tokens_param == "default" else max_tokens_param
    with registry(settings()) as (reg, conn):
        changed = reg.set_max_tokens_param(conn, name, param)
    if not changed:
        fail(f"model {name!r} is not in the registry")
    out.print(f"{name}: output-token limit sent as {param or 'the provider default'}")


@app.command("add-alias")
def add_alias(alias: str = typer.Argument(..., help="Another name clients may send."),
              name: str = typer.Argument(..., help="The model (group) it stands for.")) -> None:
    """Let clients reach a model under another name."""
    with registry(settings()) as (reg, conn):
        reg.add_alias(conn, alias, name)
    out.print(f"alias {alias} -> {name}")


FALLBACKS_ARG = typer.Argument(None, help="Models (or aliases) tried in order once NAME's own deployments are "
                               "exhausted; none: no fallbacks.")


@app.command("set-fallbacks")
def set_fallbacks(
    name: str = typer.Argument(..., help="The model (group) whose fallbacks these are."),
    fallbacks: list[str] | None = FALLBACKS_ARG,
    content_policy: bool | None = typer.Option(None, "--content-policy/--no-content-policy",
                                               help="Whether a content-policy refusal also goes to the fallbacks "
                                               "(default: unchanged; off for a new group)."),
) -> None:
    """Set a model's fallback models (none given: clear them); prints the chain a request may follow."""
    with registry(settings()) as (reg, conn):
        chain = reg.set_fallbacks(conn, name, fallbacks or [], content_policy)
        group = reg.group(conn, name)
    assert group is not None
    out.print((f"fallback chain: {' -> '.join(chain)}" if len(chain) > 1 else f"{name}: no fallbacks")
              + ("; content-policy refusals fall back too" if group.content_policy_fallbacks else ""), markup=False)


@app.command("remove-alias")
def remove_alias(alias: str = typer.Argument(..., help="The alias to remove.")) -> None:
    """Remove an alias."""
    with registry(settings()) as (reg, conn):
        removed = reg.remove_alias(conn, alias)
    if not removed:
        fail(f"alias {alias!r} is not in the registry")
    out.print(f"removed alias {alias}")


@app.command("create-key")
def create_key(
    name: str | None = typer.Option(None, help="A name for the key (shown in logs and metrics)."),
    rpm: int | None = typer.Option(None, help="Requests per minute for this key (default RATE_LIMIT_REQUESTS)."),
    tpm: int | None = typer.Option(None, help="Tokens per minute for this key (default RATE_LIMIT_TOKENS)."),
    models: str | None = typer.Option(None, help="Comma-separated models this key may use (default: all)."),
    expires: str | None = typer.Option(None, help="Expiry: a duration (30d, 12h, 90m) or a date (2027-01-31)."),
    budget: float | None = typer.Option(None, help="Spend limit in US dollars per --budget-period (default: none)."),
    budget_period: str | None = typer.Option(None, help="The budget's period: 30d, 12h, 1w, 1mo (30 days); "
                                             "default: the key's whole life."),
    log_content: bool | None = typer.Option(None, "--log-content/--no-log-content",
                                            help="Store this key's prompts and answers in the request log "
                                            "(default: REQUEST_LOG_CONTENT)."),
) -> None:
    """Create a client key. It is printed once; only its hash is stored."""
    s = settings()
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    expires_at = parse_expiry(expires)
    with registry(s) as (reg, conn):
        secret, key = reg.create_key(conn, name, rpm, tpm, model_list, expires_at, budget,
                                     parse_period(budget_period), log_content)
    print(secret)
    print(f"created key {key.name!r}; it will not be shown again", file=sys.stderr)


_PERIODS = {"mo": 30 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}


def parse_period(text: str | None) -> float | None:
    """A budget period: 30d, 12h, 90m, 1w, 1mo (30 days)."""
    if text is None:
        return None
    text = text.strip().lower()
    for unit, seconds in _PERIODS.items():
        if text.endswith(unit) and text[:-len(unit)].isdigit() and int(text[:-len(unit)]) > 0:
            return float(int(text[:-len(unit)]) * seconds)
    fail(f"--budget-period must be a duration like 30d, 12h, 1w or 1mo, got {text!r}")


@app.command("set-key-budget")
def set_key_budget(
    name: str = typer.Argument(..., help="The key's name or its prefix as list-keys shows it."),
    budget: float | None = typer.Option(None, help="Spend limit in US dollars per period."),
    budget_period: str | None = typer.Option(None, help="30d, 12h, 1w, 1mo; default: the key's whole life."),
    clear: bool = typer.Option(False, "--clear", help="Remove the key's budget."),
) -> None:
    """Set a key's budget (its period starts again now), or remove it."""
    if clear == (budget is not None):
        fail("give --budget AMOUNT or --clear")
    s = settings()
    with registry(s) as (reg, conn):
        changed = reg.set_key_budget(conn, name, None if clear else budget, parse_period(budget_period))
    if not changed:
        fail(f"no active key named {name!r}")
    out.print(f"budget of {name!r} " + ("removed" if clear else f"set to ${budget:.2f}"
                                        + (f" per {budget_period}" if budget_period else " for the key's life")))


def parse_expiry(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[:-1].isdigit() and text[-1:] in units:
        return datetime.now().timestamp() + int(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        fail(f"--expires must be a duration like 30d, 12h, 90m or a date like 2027-01-31, got {text!r}")


@app.command("list-keys")
def list_keys() -> None:
    """List client keys (names, prefixes and limits; never the keys)."""
    from router.budgets import period_of

    s = settings()
    with registry(s) as (reg, conn):
        keys = reg.load_keys(conn)
    now = datetime.now().timestamp()
    spent = _spend(s, {k.name: period_of(k, now)[0] for k in keys if k.budget is not None})
    show("client keys", ("name", "prefix", "rpm", "tpm", "models", "expires", "budget", "spent", "remaining",
                         "status"), [
        (k.name, k.key_prefix + "…", str(k.rpm or "default"), str(k.tpm or "default"),
         ", ".join(sorted(k.models)) if k.models is not None else "all",
         _when(k.expires_at) if k.expires_at else "never",
         _budget(k.budget, k.budget_period),
         f"${spent[k.name]:.4f}" if k.name in spent else "—",
         f"${max(0.0, (k.budget or 0) - spent[k.name]):.4f}" if k.name in spent else "—",
         "revoked" if k.revoked_at is not None
         else "expired" if k.expires_at is not None and k.expires_at <= now else "active")
        for k in keys])


def _budget(budget: float | None, period: float | None) -> str:
    if budget is None:
        return "—"
    if period is None:
        return f"${budget:.2f} total"
    days = period / 86400
    return f"${budget:.2f} / " + (f"{days:g}d" if days >= 1 else f"{period / 3600:g}h")


def _spend(s: Settings, since: dict[str, float]) -> dict[str, float]:
    """Each budgeted key's spend in its current period, from the request log (0 where it cannot be read)."""
    if not since:
        return {}
    from router.observability.request_log import open_log, spend_by_key

    try:
        conn = open_log(s).connect()
    except Exception:  # noqa: BLE001 - no log yet: nothing spent that it knows of
        return dict.fromkeys(since, 0.0)
    try:
        return spend_by_key(conn, since)
    finally:
        conn.close()


@app.command("revoke-key")
def revoke_key(name: str = typer.Argument(..., help="The key's name or its prefix as list-keys shows it.")) -> None:
    """Revoke a client key; routers refuse it within seconds."""
    s = settings()
    with registry(s) as (reg, conn):
        count = reg.revoke_key(conn, name.rstrip("…"))
    if not count:
        fail(f"no active key named {name!r}")
    out.print(f"revoked {name}")


@app.command("remove-model")
def remove_model(
    name: str = typer.Argument(..., help="Model name to remove."),
    deployment: str | None = typer.Option(None, help="Remove only this deployment (the model goes with its last)."),
) -> None:
    """Remove a model (its deployments and aliases), or one of its deployments."""
    s = settings()
    with registry(s) as (reg, conn):
        removed = reg.remove_model(conn, name, deployment)
    if not removed:
        fail(f"model {name!r} is not in the registry" if deployment is None
             else f"model {name!r} has no deployment {deployment!r}")
    out.print(f"removed {name}" + (f" deployment {deployment}" if deployment else ""))


@app.command("pull-model")
def pull_model(
    name: str = typer.Argument(..., help="Hugging Face repo id (org/name), or org/name/file.gguf for one GGUF file."),
    endpoint: str | None = typer.Option(None, help="Hub URL (default: the registry entry's, else huggingface.co)."),
) -> None:
    """Download a model's weights into HF_CACHE_DIR (with progress), so its first request need not wait.

    What is cached already is kept; an interrupted download is completed."""
    from router.weights import locate_folder, missing_extra, pull

    s = settings()
    found = locate_folder(name, s.hf_cache_dir)  # a plain folder is used as it is; a hub snapshot is completed
    if found is not None:
        out.print(f"{name} is already in {s.hf_cache_dir}: {found.folder}"
                  + (f" ({found.gguf_file})" if found.gguf_file else ""))
        return
    missing = missing_extra()
    if missing is not None:  # downloading needs only huggingface_hub, but serving needs the extra
        print(f"warning: {missing} not installed: the router cannot serve it until "
              "`pip install 'llm-router[hf]'`", file=sys.stderr)
    if endpoint is None:
        with registry(s) as (reg, conn):
            entry = next((d for d in reg.load_deployments(conn, name) if d.type == "huggingface"), None)
        endpoint = entry.endpoint if entry is not None else None
    token = s.hugging_face_hub_token.get_secret_value() if s.hugging_face_hub_token else None
    try:
        ref = pull(name, s.hf_cache_dir, token, endpoint)  # huggingface_hub's progress bars on stderr
    except ImportError:
        fail("huggingface_hub is not installed: pip install 'llm-router[hf]'")
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; the message is what matters
        message = Scrubber([token] if token else [])(str(exc).splitlines()[0] if str(exc) else "")
        fail(f"could not download {name}: {exc.__class__.__name__}: {message}")
    out.print(f"pulled {name} into {ref.folder}" + (f" ({ref.gguf_file})" if ref.gguf_file else ""))


def _price(explicit: float | None, default: float | None) -> str:
    if explicit is not None:
        return f"{explicit:g}"
    return f"{default:g} (default)" if default is not None else "unknown"


@app.command("list-models")
def list_models() -> None:
    """List model groups and their deployments (prices: explicit, genai-prices' default, or unknown), aliases,
    and the agents that announced themselves."""
    from router.prices import default_price
    from router.routing.deployment import DEFAULT_STRATEGY

    s = settings()
    with registry(s) as (reg, conn):
        snap = reg.load(conn)
    aliases, deployments = snap.by_group()
    rows: list[tuple[str, ...]] = []
    for g in snap.groups:
        limits = _limits(g.rpm, g.tpm)
        head = g.name + (f" (aliases: {', '.join(aliases[g.name])})" if g.name in aliases else "")
        fallbacks = (f"; fallbacks: {', '.join(g.fallbacks)}" if g.fallbacks else "") + (
            " (content policy too)" if g.fallbacks and g.content_policy_fallbacks else "")
        rows.append((head, f"strategy: {g.strategy or DEFAULT_STRATEGY}{fallbacks}", "", "", "", "", "", "", "", "",
                     f"group: {limits}" if limits else "", "", "", _when(g.updated_at)))
        for d in deployments.get(g.name, []):
            default = default_price(d.type, d.upstream_model or d.group)
            context = d.context_window or (default.context_window if default else None)
            rows.append(("", d.name, d.type, d.kind, d.endpoint, d.upstream_model or "-",
                         _price(d.input_price, default.input if default else None),
                         _price(d.output_price, default.output if default else None),
                         (f"{context}" + ("" if d.context_window else " (default)")) if context else "unknown",
                         f"{d.weight:g}", "; ".join(x for x in (_limits(d.rpm, d.tpm),
                                                                 d.max_parallel and f"{d.max_parallel} at once") if x)
                         or "-", "yes" if d.enabled else "no", _timeouts(d),
                         _when(d.updated_at)))
    show(f"models in {reg.location} (prices: USD per million tokens)",
         ("name", "deployment", "type", "kind", "endpoint", "upstream model", "input $", "output $", "context",
          "weight", "limits", "enabled", "timeouts (s)", "updated"), rows)
    if snap.agents:
        show("agents", ("name", "endpoint", "models", "last heartbeat", "credential"),
             [(a.name, a.endpoint, ", ".join(a.models), _when(a.last_heartbeat), a.token_name or "-")
              for a in snap.agents])


def _timeouts(d: DeploymentEntry) -> str:
    """The deployment's own timeouts, compactly (total, connect, first token, idle); '-': the settings'."""
    pairs = (("total", d.timeout), ("connect", d.connect_timeout), ("first token", d.first_token_timeout),
             ("idle", d.idle_timeout))
    return " ".join(f"{label} {value:g}" for label, value in pairs if value is not None) or "-"


@app.command("apply")
def apply_file(
    file: str = typer.Argument(..., help="YAML file: models -> {strategy, rpm, tpm, fallbacks, "
                              "content_policy_fallbacks, aliases, deployments}."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the changes; write nothing."),
) -> None:
    """Make the registry's models, deployments and aliases match FILE (agents are left alone), in one
    transaction; prints each change. Applying the same file twice changes nothing."""
    from router.apply import parse, plan

    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    with registry(settings()) as (reg, conn):
        changes = plan(parse(text, file), reg.load(conn))
        if not changes.empty and not dry_run:
            changes.write(reg, conn)
    for line in changes.lines:
        out.print(line, markup=False)
    if changes.empty:
        out.print(f"no changes: the registry already matches {file}")
    else:
        out.print(changes.summary() + (" (dry run: nothing written)" if dry_run else ""))


@app.command("export")
def export_file(file: str | None = typer.Argument(None, help="Where to write (default: standard output).")) -> None:
    """Write the registry's models, deployments and aliases in the format `router apply` reads."""
    from router.apply import export

    with registry(settings()) as (reg, conn):
        text = export(reg.load(conn))
    if file is None:
        sys.stdout.write(text)
        return
    try:
        with open(file, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        fail(f"cannot write {file}: {exc.strerror or exc}")
    print(f"wrote {file}", file=sys.stderr)


@app.command("create-agent-token")
def create_agent_token(
    name: str = typer.Argument(..., help="The token's name; agents registered with it are bound to it."),
    models: str | None = typer.Option(None, help="Comma-separated model names that hosted providers serve "
                                         "(gpt-..., claude...) which agents with this token may still announce."),
) -> None:
    """Create an agent registration token. It is printed once; only its hash is stored."""
    s = settings()
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    with registry(s) as (reg, conn):
        secret, token = reg.create_agent_token(conn, name, model_list)
    print(secret)
    print(f"created agent token {token.name!r}; it will not be shown again", file=sys.stderr)


@app.command("list-agent-tokens")
def list_agent_tokens() -> None:
    """List agent tokens (names, prefixes, extra models; never the tokens)."""
    s = settings()
    with registry(s) as (reg, conn):
        tokens = reg.load_agent_tokens(conn)
    show("agent tokens", ("name", "prefix", "models", "created", "status"), [
        (t.name, t.token_prefix + "…", ", ".join(sorted(t.models)) if t.models else "-", _when(t.created_at),
         "revoked" if t.revoked_at is not None else "active") for t in tokens])


@app.command("revoke-agent-token")
def revoke_agent_token(name: str = typer.Argument(..., help="The token's name or its prefix.")) -> None:
    """Revoke an agent token; routers refuse it within seconds (its agents' names stay bound to it)."""
    s = settings()
    with registry(s) as (reg, conn):
        count = reg.revoke_agent_token(conn, name.rstrip("…"))
    if not count:
        fail(f"no active agent token named {name!r}")
    out.print(f"revoked agent token {name}")


@app.command("health")
def health(
    url: str | None = typer.Option(None, help="The router's base URL (default http://ROUTER_HOST:ROUTER_PORT)."),
) -> None:
    """Each deployment's state as a running router sees it: circuit (closed, open, half-open), failures,
    when an ejected one returns, requests in flight, latency estimates (GET /health/deployments with
    ROUTER_MASTER_KEY)."""
    s = settings()
    host = "127.0.0.1" if s.router_host in ("0.0.0.0", "::", "") else s.router_host
    base = (url or f"http://{host}:{s.router_port}").rstrip("/")
    key = s.router_master_key.get_secret_value() if s.router_master_key else None
    data = fetch_json(base + "/health/deployments", {"Authorization": f"Bearer {key}"} if key else {},
                      Scrubber([key] if key else []))
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    rows: list[tuple[str, ...]] = []
    for d in data.get("data", []):
        returns = d.get("returns_at")
        rows.append((d["model"], d["deployment"], d["type"], d["state"] + (" (cooling)" if d.get("cooling") else ""),
                     f"{d.get('consecutive_failures', 0)} / {d.get('total_failures', 0)}", str(d.get("ejections", 0)),
                     _when(returns) if returns else "-", str(d.get("in_flight", 0)), ms(d.get("ttft")),
                     ms(d.get("latency")), (d.get("reason") or "")[:80]))
    show(f"deployments at {base}", ("model", "deployment", "type", "state", "failures (in a row / all)",
                                    "ejections", "returns", "in flight", "TTFT", "latency", "reason"), rows)


def show(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print a table (whole cells when piped)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _limits(rpm: int | None, tpm: int | None) -> str:
    return f"{rpm or '-'} rpm, {tpm or '-'} tpm" if rpm or tpm else ""


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Listing:
    """How a provider lists its models: where, with which auth, and how to read a page."""

    type: str
    url_var: str
    key_var: str
    path: str
    auth: Callable[[str, Settings], dict[str, str]]
    page: Callable[[dict[str, Any]], tuple[list[str], dict[str, str] | None]]  # ids, next page's query
    key_required: bool = True
    kind: str = "api"


def _openai_page(data: dict[str, Any]) -> tuple[list[str], dict[str, str] | None]:
    return [m["id"] for m in data["data"]], None


def _anthropic_page(data: dict[str, Any]) -> tuple[list[str], dict[str, str] | None]:
    ids = [m["id"] for m in data["data"]]
    return ids, ({"limit": "1000", "after_id": data["last_id"]} if data.get("has_more") else None)


def _google_page(data: dict[str, Any]) -> tuple[list[str], dict[str, str] | None]:
    ids = [m["name"].removeprefix("models/") for m in data.get("models", [])
           if "generateContent" in m.get("supportedGenerationMethods", [])]
    token = data.get("nextPageToken")
    return ids, ({"pageSize": "1000", "pageToken": token} if token else None)


LISTINGS = {
    "openai": Listing("openai", "OPENAI_BASE_URL", "EXTERNAL_OPENAI_KEY", "/v1/models",
                      lambda key, s: {"Authorization": f"Bearer {key}"}, _openai_page),
    "anthropic": Listing("anthropic", "ANTHROPIC_BASE_URL", "EXTERNAL_ANTHROPIC_KEY", "/v1/models?limit=1000",
                         lambda key, s: {"x-api-key": key, "anthropic-version": s.anthropic_version},
                         _anthropic_page),
    "google": Listing("google", "GOOGLE_BASE_URL", "EXTERNAL_GOOGLE_KEY", "/v1beta/models?pageSize=1000",
                      lambda key, s: {"x-goog-api-key": key}, _google_page),
    "openrouter": Listing("openrouter", "OPENROUTER_BASE_URL", "EXTERNAL_OPENROUTER_KEY", "/v1/models",
                          lambda key, s: {"Authorization": f"Bearer {key}"} if key else {}, _openai_page,
                          key_required=False),
    # the llm-d inference gateway (OpenAI-compatible; a key only when the gateway requires one)
    "llm-d": Listing("llm-d", "LLMD_ENDPOINT", "LLMD_API_KEY", "/v1/models",
                     lambda key, s: {"Authorization": f"Bearer {key}"} if key else {}, _openai_page,
                     key_required=False, kind="weight"),
}


def refresh(listing: Listing) -> None:
    """Upsert every model the provider lists as type `listing.type`, kind `listing.kind`: all or nothing."""
    from router.providers.base import normalize_base_url

    s = settings()
    secret = getattr(s, listing.key_var.lower())
    if secret is None and listing.key_required:
        fail(f"{listing.key_var} is not set")
    base = getattr(s, listing.url_var.lower())
    if base is None:
        fail(f"{listing.url_var} is not set")
    try:
        validate_url(base, listing.url_var)
    except RegistryError as exc:
        fail(str(exc))
    key = secret.get_secret_value() if secret is not None else ""
    scrub = Scrubber([key])
    url = normalize_base_url(base) + listing.path
    names: list[str] = []
    for _ in range(100):  # pages, bounded
        try:
            ids, next_query = listing.page(fetch_json(url, listing.auth(key, s), scrub))
            if not all(isinstance(i, str) and i for i in ids):
                raise TypeError("model ids must be non-empty strings")
        except (KeyError, TypeError, AttributeError) as exc:
            fail(f"{url} did not answer a model list: {exc.__class__.__name__} {exc}")
        names += ids
        if next_query is None:
            break
        url = normalize_base_url(base) + listing.path.split("?", 1)[0] + "?" + urllib.parse.urlencode(next_query)
    with registry(s) as (reg, conn):
        changes = reg.sync_models(conn, listing.type, base, listing.kind, names)
    report(changes)


@app.command("refresh-openai")
def refresh_openai() -> None:
    """Upsert the models listed by {OPENAI_BASE_URL}/v1/models as type openai."""
    refresh(LISTINGS["openai"])


@app.command("refresh-anthropic")
def refresh_anthropic() -> None:
    """Upsert the models listed by {ANTHROPIC_BASE_URL}/v1/models as type anthropic."""
    refresh(LISTINGS["anthropic"])


@app.command("refresh-google")
def refresh_google() -> None:
    """Upsert the Gemini models that support generateContent as type google."""
    refresh(LISTINGS["google"])


@app.command("refresh-openrouter")
def refresh_openrouter() -> None:
    """Upsert the models listed by {OPENROUTER_BASE_URL}/v1/models as type openrouter."""
    refresh(LISTINGS["openrouter"])


@app.command("refresh-llmd")
def refresh_llmd() -> None:
    """Upsert the models the llm-d gateway at {LLMD_ENDPOINT} lists (/v1/models) as type llm-d, kind weight."""
    refresh(LISTINGS["llm-d"])


def fetch_json(url: str, headers: dict[str, str], scrub: Scrubber, timeout: float = 15.0) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = scrub(exc.read().decode("utf-8", "replace")[:300].replace("\n", " "))
        fail(f"{url} answered HTTP {exc.code}: {detail}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(f"could not reach {url}: {scrub(str(reason))}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        fail(f"{url} did not answer JSON: {exc}")


def report(changes: dict[str, list[str]]) -> None:
    for verb in ("added", "updated", "skipped"):
        for name in changes[verb]:
            note = " (registered under another type)" if verb == "skipped" else ""
            out.print(f"{verb} {name}{note}")
    out.print(", ".join(f"{len(v)} {k}" for k, v in changes.items()))


_SPANS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """`30m`, `24h`, `7d`, `2w` before now, or an ISO date/time (local time when it has no zone)."""
    now = time.time() if now is None else now
    text = text.strip()
    unit = _SPANS.get(text[-1:].lower())
    if unit is not None and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * unit
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        fail(f"cannot read the time {text!r}: use 30m, 24h, 7d, 2w, or an ISO date such as 2026-11-01")


@app.command("usage")
def usage(
    by: str = typer.Option("model", help="Group rows by key, model, deployment or day (UTC)."),
    since: str = typer.Option("7d", help="From: 30m, 24h, 7d, 2w ago, or an ISO date."),
    until: str | None = typer.Option(None, help="Until (same forms; default now)."),
    key: str | None = typer.Option(None, help="Only this client key's requests (its name)."),
    model: str | None = typer.Option(None, help="Only this model group's requests."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rather than a table."),
) -> None:
    """Requests, errors, tokens and spend from the request log."""
    from router.observability.request_log import open_log, usage as read_usage

    if by not in ("key", "model", "deployment", "day"):
        fail("--by must be key, model, deployment or day")
    s = settings()
    store_ = open_log(s)
    try:
        conn = store_.connect()
    except Exception as exc:  # noqa: BLE001
        fail(f"cannot open the request log at {store_.location}: {one_line(exc)}")
    try:
        rows = read_usage(conn, by, parse_since(since), parse_since(until) if until else None, key, model)
    finally:
        conn.close()
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    show(f"usage by {by} since {since}", (by, "requests", "errors", "prompt tokens", "completion tokens",
                                          "cached tokens", "cost (USD)", "avg latency ms"), [
        (str(r[by] if r[by] is not None else "-"), str(r["requests"]), str(r["errors"]), f"{r['prompt_tokens']:,}",
         f"{r['completion_tokens']:,}", f"{r['cached_tokens']:,}",
         f"{r['cost']:.4f}" + (f" (+{r['unpriced']} unpriced)" if r["unpriced"] else ""),
         str(r["avg_latency_ms"] if r["avg_latency_ms"] is not None else "-"))
        for r in rows])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
