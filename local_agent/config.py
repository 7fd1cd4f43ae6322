"""Local Agent configuration: one typed settings object and its workers.

Sources, highest first: environment variables (`AGENT_*`), then the config
file named by `AGENT_CONFIG` (YAML or TOML, by extension; default
`local_agent.yaml` or `local_agent.toml` in the working directory if one
exists), then the defaults below. A worker is one model served by one engine
process; several workers may serve the same model.
"""

from __future__ import annotations

import os
import socket
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from router.config import ConfigError, config_error

DEFAULT_FILES = ("local_agent.yaml", "local_agent.yml", "local_agent.toml")
_config_file: ContextVar[Path | None] = ContextVar("agent_config_file", default=None)


class WorkerSpec(BaseModel):
    """One engine process (or an external server) serving one model."""

    model_config = ConfigDict(extra="forbid")

    #: the name clients (and the router) use
    model: str = Field(min_length=1)
    engine: Literal["vllm"] = "vllm"
    launcher: Literal["docker", "process", "external"]
    #: what the engine loads (`--model`): a Hugging Face repo id or a folder; default: `model`
    weights: str | None = None
    #: external: the server's base URL (with or without /v1)
    url: str | None = None
    #: external: the name the server knows the model by, if not `model` (the request is rewritten)
    upstream_model: str | None = None
    #: docker/process: where the engine listens
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    #: extra engine arguments, e.g. ["--max-model-len", "8192"]
    args: list[str] = []
    #: extra environment for the engine process (docker: passed by name with -e, never on the command line)
    env: dict[str, str] = {}
    #: process: the whole command instead of `<python> -m vllm.entrypoints.openai.api_server`
    command: list[str] | None = None
    python: str | None = None
    #: docker
    image: str = "vllm/vllm-openai:latest"
    gpus: str = "all"  # "all", or device ids: "0" or "0,1"
    cache_dir: str = "~/.cache/huggingface"
    docker: str = "docker"
    #: health: path polled on the worker (default /health; external: /v1/models)
    health_path: str | None = None
    health_interval: float = Field(5.0, gt=0)
    start_timeout: float = Field(900.0, gt=0)
    stop_timeout: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check_launcher(self) -> WorkerSpec:
        if self.launcher == "external":
            if not self.url:
                raise ValueError(f"worker '{self.model}': launcher 'external' needs 'url'")
        elif self.port is None:
            raise ValueError(f"worker '{self.model}': launcher '{self.launcher}' needs 'port'")
        return self

    @property
    def health(self) -> str:
        if self.health_path:
            return self.health_path
        return "/v1/models" if self.launcher == "external" else "/health"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENT_", extra="ignore", case_sensitive=False)

    #: the router to announce to; empty: run standalone (no registration)
    router_url: str | None = "http://localhost:8000"
    #: the router's ROUTER_AGENT_TOKEN; when set, this agent's /v1 endpoints also require it
    router_token: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "router_token", "agent_router_token", "router_agent_token"))
    name: str = Field(default_factory=socket.gethostname, min_length=1)
    #: the URL the router reaches this agent at
    endpoint: str = "http://localhost:5000"
    heartbeat_interval: float = Field(10.0, gt=0)
    workers: list[WorkerSpec] = []
    log_dir: str = "logs"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: forwarding to workers
    request_timeout: float = Field(600.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    #: restarts of a crashed worker wait 1, 2, 4 ... seconds, up to this
    restart_backoff_max: float = Field(60.0, gt=0)

    @field_validator("router_url", "router_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _distinct_ports(self) -> AgentSettings:
        seen: set[tuple[str, int]] = set()
        for w in self.workers:
            if w.port is not None and w.launcher != "external":
                if (w.host, w.port) in seen:
                    raise ValueError(f"two workers listen on {w.host}:{w.port}")
                seen.add((w.host, w.port))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return init_settings, env_settings
        if path.suffix in (".yaml", ".yml"):
            file_source: PydanticBaseSettingsSource = YamlConfigSettingsSource(settings_cls, yaml_file=path)
        else:
            file_source = TomlConfigSettingsSource(settings_cls, toml_file=path)
        return init_settings, env_settings, file_source


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file: the one given, else AGENT_CONFIG, else a default name present here."""
    named = explicit or os.environ.get("AGENT_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"invalid configuration: AGENT_CONFIG: no such file {path}")
        if path.suffix not in (".yaml", ".yml", ".toml"):
            raise ConfigError(f"invalid configuration: AGENT_CONFIG: {path} is neither .yaml/.yml nor .toml")
        return path
    for name in DEFAULT_FILES:
        if Path(name).is_file():
            return Path(name)
    return None


def load_agent_settings(path: str | os.PathLike[str] | None = None, **overrides: object) -> AgentSettings:
    token = _config_file.set(config_path(path))
    try:
        return AgentSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise config_error(exc) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # an unreadable or malformed file
        detail = " ".join(str(exc).split())
        raise ConfigError(f"invalid configuration: {_config_file.get() or 'file'}: {detail}") from None
    finally:
        _config_file.reset(token)
