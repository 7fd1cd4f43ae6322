"""Router configuration: one typed settings object.

Sources, highest first: environment variables, a `.env` file in the working
directory, `[tool.router]` in `pyproject.toml`, then the defaults below.
Provider keys are `SecretStr`, so they never show up in a repr or a log line.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        pyproject_toml_table_header=("tool", "router"),
    )

    # Server
    router_host: str = "127.0.0.1"
    router_port: int = Field(8000, ge=1, le=65535)
    router_workers: int = Field(1, ge=1, le=64)
    # proxies whose X-Forwarded-For is believed (comma-separated IPs/CIDRs, or *); unset: the socket's address
    router_trusted_proxies: str | None = None

    # Postgres registry (several replicas share one): postgresql://user:password@host:5432/db; unset: the
    # SQLite file SQLITE_DB_PATH. A SecretStr: the URL may carry a password.
    database_url: SecretStr | None = None

    @field_validator("database_url", mode="before")
    @classmethod
    def _postgres_url(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, str) and not v.strip().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (unset it to use SQLITE_DB_PATH)")
        return v.strip() if isinstance(v, str) else v

    # Registry and agents
    sqlite_db_path: str = "data/models.db"
    registry_poll_interval: float = Field(1.0, gt=0, le=60)
    agent_ttl: float = Field(30.0, gt=0)
    # a shared agent credential (per-agent tokens: `router create-agent-token`)
    router_agent_token: SecretStr | None = None
    # [agents] networks agents may register from and announce endpoints in (comma-separated CIDRs); unset: any
    # address except link-local and cloud-metadata ones
    router_agent_networks: str | None = None
    # [agents] model names a hosted provider would serve that agents may still announce (comma-separated, or *)
    router_agent_allowed_models: str | None = None
    agent_register_rpm: int = Field(60, ge=1)  # [agents] registrations per minute per client address
    agent_retention: float = Field(86400.0, gt=0)  # [agents] seconds a dead agent is kept before it is deleted

    # Providers
    local_agent_url: str | None = "http://localhost:5000"
    openai_base_url: str = "https://api.openai.com"
    external_openai_key: SecretStr | None = None
    llmd_endpoint: str | None = None
    llmd_api_key: SecretStr | None = None
    anthropic_base_url: str = "https://api.anthropic.com"
    external_anthropic_key: SecretStr | None = None
    anthropic_version: str = "2023-06-01"
    anthropic_default_max_tokens: int = Field(4096, ge=1)
    google_base_url: str = "https://generativelanguage.googleapis.com"
    external_google_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api"
    external_openrouter_key: SecretStr | None = None
    openrouter_referer: str | None = None  # sent as HTTP-Referer (OpenRouter app attribution)
    openrouter_title: str | None = None  # sent as X-Title
    grok_base_url: str = "https://api.x.ai"
    external_grok_key: SecretStr | None = None
    groq_base_url: str = "https://api.groq.com/openai"
    external_groq_key: SecretStr | None = None
    venice_base_url: str = "https://api.venice.ai/api"
    external_venice_key: SecretStr | None = None
    hf_cache_dir: str = "data/hf_models"
    hf_device: str = Field("cpu", pattern=r"^(cpu|auto|mps|cuda(:\d+)?)$")  # cpu, cuda, cuda:N, mps, auto
    hugging_face_hub_token: SecretStr | None = None
    hf_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, else the checkpoint's
    hf_max_loaded_models: int = Field(1, ge=1)
    hf_max_concurrency: int = Field(1, ge=1)  # generations at once per model
    hf_max_queue: int = Field(32, ge=0)  # requests waiting per model before 503

    # Upstream HTTP
    upstream_connect_timeout: float = Field(10.0, gt=0)
    upstream_timeout: float = Field(600.0, gt=0)
    # [resilience] a stream's first content token must come within this many seconds (else the next
    # deployment is tried); a stream's socket may then stay silent at most this long (its head included);
    # both per deployment in the registry too
    upstream_first_token_timeout: float = Field(120.0, gt=0)
    upstream_idle_timeout: float = Field(120.0, gt=0)
    router_num_retries: int = Field(2, ge=0, le=10)  # [resilience] attempts per request: 1 + this
    router_retry_after_cap: float = Field(30.0, ge=0)  # [resilience] longest Retry-After honoured (seconds)
    # [resilience: circuit breaker] a deployment is ejected after FAILURES consecutive failures, or when more
    # than FAILURE_RATE of at least MIN_REQUESTS requests within WINDOW seconds failed; the k-th ejection in a
    # row lasts BASE_EJECTION x 2^(k-1) s (shortened at random by up to 20 %), at most MAX_EJECTION s
    router_breaker_failures: int = Field(5, ge=1)
    router_breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    router_breaker_min_requests: int = Field(20, ge=1)
    router_breaker_window: float = Field(30.0, gt=0)
    router_breaker_base_ejection: float = Field(5.0, gt=0)
    router_breaker_max_ejection: float = Field(300.0, gt=0)
    upstream_max_connections: int = Field(1000, ge=1)
    # [upstream] idle pooled connections are closed after this long: below common upstream keep-alive
    # timeouts (uvicorn and Node: 5 s), so the router rarely reuses one the upstream is closing
    upstream_keepalive_timeout: float = Field(4.0, gt=0, le=300)
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # [upstream] a non-streaming answer, whole
    max_stream_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # [upstream] one line of an upstream stream
    # [upstream] this router's id in the x-llm-router-hops header (loop detection); unset: random per process
    router_instance_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    request_body_timeout: float = Field(30.0, gt=0)  # [edge] seconds to receive a whole request body
    request_header_timeout: float = Field(10.0, gt=0)  # [edge] seconds to receive a request's headers
    router_max_connections: int = Field(4096, ge=1)  # [edge] concurrent connections per worker; beyond: 503

    # [shutdown] on SIGTERM /ready answers 503 at once; connections are still accepted for SHUTDOWN_DELAY
    # seconds (a load balancer sees the 503 first), then the listener closes and in-flight requests and streams
    # get SHUTDOWN_GRACE_PERIOD seconds to finish before what is left is cut (router/shutdown.py)
    shutdown_delay: float = Field(5.0, ge=0, le=600)
    shutdown_grace_period: float = Field(30.0, ge=0, le=3600)

    # Client keys
    router_master_key: SecretStr | None = None
    metrics_require_key: bool = False  # /metrics only with the master key

    # Redis (shared cache and limits across router processes); optional
    redis_url: SecretStr | None = None  # may carry a password
    redis_timeout: float = Field(0.1, gt=0, le=10)  # seconds per Redis call before giving up on it
    redis_retry_after: float = Field(5.0, gt=0)  # seconds Redis is left alone after a failure

    # Response cache
    cache_mode: Literal["deterministic", "all", "off"] = "deterministic"
    cache_ttl: int = Field(300, ge=1)
    cache_max_entries: int = Field(10_000, ge=1)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # Rate limits (per minute; 0 means no limit, the default: `.env.example` shows the design's 60)
    rate_limit_requests: int = Field(0, ge=0)
    rate_limit_tokens: int = Field(0, ge=0)
    rate_limit_on_redis_failure: Literal["local", "open", "closed"] = "local"

    # Smart routing weights
    router_cost_weight: float = 1.0
    router_latency_weight: float = 1.0
    router_cost_threshold: float = 1000

    # Observability
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_dir: str = "logs"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line, for log shippers
    access_log: bool = True  # one INFO line per request (method, path, model, deployment, status, tokens, ...)
    # [metrics] client key names as a label on the per-client series (never key values); off: no client label
    metrics_key_labels: bool = False
    cost_header: bool = False  # `x-router-cost` (USD) on every answer whose cost is known
    # [request log] one row per request, written in batches off the request path: SQLite in its own file
    # (REQUEST_LOG_PATH, default `requests.db` beside the registry) or the registry's Postgres database
    request_log: bool = True
    request_log_path: str | None = None
    request_log_retention_days: float = Field(30.0, gt=0)
    request_log_queue: int = Field(10_000, ge=1)  # rows waiting to be written; beyond, rows are dropped (counted)
    request_log_content: bool = False  # store prompts and answers (also per key: `create-key --log-content`)
    # [responses] stored Responses-API responses of translated deployments (`store`, `previous_response_id`)
    responses_store_days: float = Field(30.0, gt=0)
    # [tracing] OTLP export when set (the OpenTelemetry SDK reads its other OTEL_* variables itself)
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "llm-router"

    @field_validator("cache_mode", "rate_limit_on_redis_failure", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("router_agent_networks")
    @classmethod
    def _networks(cls, v: str | None) -> str | None:
        if v is not None:
            for part in v.split(","):
                if part.strip():
                    try:
                        ipaddress.ip_network(part.strip(), strict=False)
                    except ValueError as exc:
                        raise ValueError(f"not a list of CIDRs: {exc}") from None
        return v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator(
        "local_agent_url", "llmd_endpoint", "redis_url", "router_agent_token",
        "external_openai_key", "external_anthropic_key", "external_google_key",
        "external_openrouter_key", "external_grok_key", "external_groq_key", "external_venice_key",
        "llmd_api_key", "openrouter_referer", "openrouter_title", "router_master_key", "router_trusted_proxies",
        "hugging_face_hub_token", "router_agent_networks", "router_agent_allowed_models", "router_instance_id",
        "request_log_path", "otel_exporter_otlp_endpoint", mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        # `LLMD_ENDPOINT=` in a .env file means "not set", as in the design's sample.
        return None if isinstance(v, str) and not v.strip() else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            _UpperKeysPyproject(settings_cls),
        )


class _UpperKeysPyproject(PyprojectTomlConfigSettingsSource):
    """`[tool.router]` keys are written like the environment (ROUTER_COST_WEIGHT)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.toml_data = {k.lower(): v for k, v in self.toml_data.items()}
        self.init_kwargs = self.toml_data


class ConfigError(Exception):
    """Raised with a one-line message naming each invalid variable."""


def config_error(exc: ValidationError) -> ConfigError:
    """One line naming each invalid variable (as its environment name) and what is wrong."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]).upper() or "settings"
        parts.append(f"{name}: {err['msg']}")
    return ConfigError("invalid configuration: " + "; ".join(parts))


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise config_error(exc) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
