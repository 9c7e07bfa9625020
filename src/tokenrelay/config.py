"""Settings: one object, read once at start-up and passed down.

Sources, strongest first: explicit overrides (command-line flags), environment variables
(``TOKENRELAY_*``; the upstream key also falls back to ``OPENAI_API_KEY``), an optional TOML
file (``--config``), then the defaults below. A bad value stops start-up with a message that
names the setting.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, FilePath, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "TOKENRELAY_"


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""


class UpstreamRoute(BaseModel):
    """One entry of ``routes``: the models matching ``pattern`` go to this upstream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(min_length=1, description="A model name or glob, e.g. 'gpt-*'.")
    kind: Literal["openai", "anthropic", "simulator"] = "openai"
    url: str | None = Field(default=None, description="Base URL (…/v1); not for the simulator.")
    key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    name: str | None = Field(default=None, description="Shown in logs; a fallback refers to it.")
    models: list[str] = Field(default_factory=list, description="Names listed by /v1/models.")
    connect_timeout: float | None = Field(default=None, gt=0)
    read_timeout: float | None = Field(default=None, gt=0)
    fallback: str | None = Field(default=None, description="Name of the route tried when this one fails.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @property
    def label(self) -> str:
        return self.name or self.pattern


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True, frozen=True
    )

    # --- where the answers come from ---
    upstream_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible API (…/v1). Unset: the built-in simulator.",
    )
    upstream_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("upstream_key", "TOKENRELAY_UPSTREAM_KEY", "OPENAI_API_KEY"),
        description="API key sent to the upstream. Never sent to clients, never logged.",
    )
    model: str | None = Field(
        default=None, description="Model used when a request names none ('sim' on the simulator)."
    )

    # --- serving ---
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    heartbeat_interval: float = Field(
        default=15.0, gt=0, description="Seconds of silence before an SSE ': ping' comment."
    )
    keepalive_timeout: int = Field(
        default=5, gt=0,
        description="Seconds an idle client connection stays open. Behind a load balancer that reuses "
                    "connections (AWS ALB: 60 s), make it longer than the balancer's idle timeout.",
    )

    # --- model routing and retries ---
    routes: list[UpstreamRoute] = Field(
        default_factory=list,
        description="Models → upstreams, first match wins ([[routes]] in TOML, JSON in the environment).",
    )
    retries: int = Field(default=2, ge=0, le=10, description="Retries per upstream before the first byte.")
    retry_backoff: float = Field(default=0.25, ge=0, description="First retry delay (s); doubles each time.")
    retry_budget: float = Field(default=5.0, ge=0, description="Most seconds spent waiting to retry, per request.")

    # --- upstream timeouts (seconds) ---
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(
        default=120.0, gt=0, description="Longest silence from the upstream, before its first byte too."
    )
    pool_size: int = Field(default=1000, gt=0, description="Upstream connections kept open at most.")
    spare_connection: bool = Field(
        default=True,
        description="Keep one spare connection open to each upstream host, so a new stream does not wait "
                    "for the TCP and TLS handshakes when every open connection is busy.",
    )
    upstream_client: Literal["auto", "fast", "aiohttp"] = Field(
        default="auto",
        description="The HTTP client for upstream requests. 'auto': tokenrelay's own fast client, and "
                    "aiohttp for upstreams that HTTPS_PROXY/HTTP_PROXY (minus NO_PROXY) send through a proxy; "
                    "'fast': always the fast one (proxies ignored); 'aiohttp': always aiohttp (more CPU per request).",
    )
    upstream_ca_bundle: FilePath | None = Field(
        default=None,
        description="PEM file of the certificate authorities trusted for https upstreams, instead of the system's.",
    )
    upstream_client_cert: FilePath | None = Field(
        default=None,
        description="PEM file with a client certificate and its private key, for upstreams that require mutual TLS.",
    )

    # --- the built-in simulator ---
    sim_ttft: float = Field(default=0.25, ge=0, description="Simulated time to first token (s).")
    sim_tps: float = Field(default=40.0, ge=0, description="Simulated tokens per second; 0: no delay.")
    sim_tokens: int = Field(default=80, ge=0, description="Simulated answer length in tokens.")
    sim_seed: int = Field(default=0, description="Seed; the same seed gives the same answer.")

    # --- jobs and webhooks (docs/jobs.md) ---
    data_dir: Path = Field(
        default_factory=lambda: default_data_dir(),
        description="Where jobs and pending webhooks are kept (SQLite). Default: $XDG_DATA_HOME/tokenrelay.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis shared by several tokenrelay processes: the jobs' task queue (run by "
        "'tokenrelay worker') and the per-key limits.",
    )
    job_concurrency: int = Field(default=16, gt=0, description="Jobs one process runs at once.")
    jobs_in_serve: bool = Field(
        default=True, description="With redis_url: 'tokenrelay serve' runs jobs from the queue too; false leaves "
        "them to 'tokenrelay worker' processes.",
    )
    job_heartbeat: int = Field(
        default=10, gt=0, description="Seconds without a worker's heartbeat before its job is run again."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks signing secret (whsec_…); required for jobs with a webhook_url."
    )
    webhook_timeout: float = Field(default=10.0, gt=0, description="Seconds one delivery attempt may take.")
    webhook_max_attempts: int = Field(default=8, gt=0, description="Delivery attempts before a webhook fails.")
    webhook_backoff: float = Field(default=2.0, ge=0, description="Seconds before the first retry; doubles each time.")
    webhook_backoff_max: float = Field(default=900.0, ge=0, description="Longest wait between two attempts (s).")
    webhook_allow_private: bool = Field(
        default=False, description="Deliver to private, loopback and link-local addresses too."
    )

    # --- client keys, limits, CORS (docs/auth-and-limits.md) ---
    api_keys: SecretStr | None = Field(
        default=None,
        description="Client keys, comma-separated; when set, /api/* and /v1/* need 'Authorization: Bearer KEY'.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of client keys, one per line: 'KEY' or 'KEY NAME'; '#' starts a comment."
    )
    max_concurrent_streams_per_key: int = Field(
        default=0, ge=0, description="Requests one key (without keys: one client address) may have open; 0: no limit."
    )
    requests_per_minute_per_key: int = Field(
        default=0, ge=0, description="Requests one key (without keys: one client address) may start per minute; 0: no limit."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins that browsers may call the API from, comma-separated ('*': any). Empty: CORS off.",
    )

    # --- logs ---
    log_level: str = "info"
    log_json: bool = False
    log_prompts: bool = False

    @field_validator("upstream_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, routes: list[UpstreamRoute]) -> list[UpstreamRoute]:
        names = [r.label for r in routes]
        for route in routes:
            if route.kind != "simulator" and route.url is None:
                raise ValueError(f"route {route.label!r}: url is required for kind {route.kind!r}")
            if route.key_env and not os.environ.get(route.key_env):
                raise ValueError(f"route {route.label!r}: the environment variable {route.key_env} is not set")
            if route.fallback is not None and route.fallback not in names:
                raise ValueError(f"route {route.label!r}: fallback {route.fallback!r} names no route")
        return routes

    @field_validator("upstream_ca_bundle", "upstream_client_cert")
    @classmethod
    def _check_pem(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        import ssl

        # Loaded now, so a file that is not the PEM it should be stops start-up here.
        try:
            if info.field_name == "upstream_ca_bundle":
                ssl.create_default_context(cafile=value)
            else:
                ssl.create_default_context().load_cert_chain(value)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load {value}: {exc}") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        from .auth import parse_keys

        if not parse_keys(value.get_secret_value()):
            raise ValueError("no key given (unset it to leave the API open)")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        from .auth import read_keys_file

        # A missing file, a bad line or no key at all stops start-up here: a typo must not
        # leave the API open.
        if not read_keys_file(value):
            raise ValueError(f"{value} holds no key")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis:// (or rediss://, unix://) URL")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        from standardwebhooks.webhooks import Webhook

        try:
            Webhook(value.get_secret_value())
        except Exception:
            raise ValueError("must be a Standard Webhooks secret: 'whsec_' and base64") from None
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _check_origins(cls, value: Any) -> list[str]:
        items = value.split(",") if isinstance(value, str) else list(value or [])
        origins = [str(item).strip().rstrip("/") for item in items if str(item).strip()]
        for origin in origins:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com (or '*')")
        return origins

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("must be one of critical, error, warning, info, debug")
        return value.lower()

    @property
    def simulated(self) -> bool:
        return self.upstream_url is None

    @property
    def default_model(self) -> str | None:
        return self.model or ("sim" if self.simulated else None)

    @property
    def upstream_label(self) -> str:
        """The upstream as it may be shown to users: no credentials, no query."""
        if self.upstream_url is None:
            return "simulator"
        parts = urlsplit(self.upstream_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenrelay"


def _http_url(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    assert value is not None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
    return value.rstrip("/")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags, environment and an optional TOML file.

    Values from the TOML file are weaker than the environment, so they are applied only
    for the fields the environment leaves unset.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(file_values) - set(Settings.model_fields))
        if unknown:
            raise SettingsError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        from_env = Settings(**given)
        # Fields still at their defaults may come from the file.
        explicit = from_env.model_fields_set
        merged = {k: v for k, v in file_values.items() if k not in explicit}
        if not merged:
            return from_env
        return Settings(**{**merged, **given})
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except ValueError as exc:  # pydantic-settings' own: a list setting's value is not JSON
        if "error parsing value" not in str(exc):
            raise
        raise SettingsError(f"invalid setting: {exc} (list settings such as TOKENRELAY_ROUTES take JSON)") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        env_name = ENV_PREFIX + field.upper() if field in Settings.model_fields else field
        where = ".".join(str(part) for part in err["loc"]) or field  # routes.0.kind: which entry
        lines.append(f"invalid setting {env_name} ({where}): {err['msg']}")
    return "\n".join(lines)
