"""Settings: one object, read once at start-up and passed down.

Sources, strongest first: explicit overrides (command-line flags, named after the setting:
``port`` is ``--port``), environment variables (``TOKENRELAY_*``; the upstream key also falls
back to ``OPENAI_API_KEY``), an optional TOML file (``--config``), then the defaults below.
A bad value stops start-up with a message that names the flag, the variable or the file's
key it came from.

Each setting is described once, in its ``Field(description=...)``: ``tokenrelay serve --help``
is generated from those, grouped by ``SECTIONS``.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .keys import parse_keys, read_keys_file, secret_flaw

ENV_PREFIX = "TOKENRELAY_"

# Variables tokenrelay reads that are not settings, so that they do not draw the
# "not a setting" warning: the config file and process count handed to 'serve --workers'
# processes (app.CONFIG_FILE_ENV, app.SERVE_PROCESSES_ENV), and the service's URL and client
# key used by 'ask' and 'doctor'.
OTHER_ENV = frozenset({"TOKENRELAY_CONFIG_FILE", "TOKENRELAY_SERVE_PROCESSES", "TOKENRELAY_URL", "TOKENRELAY_API_KEY"})

# Standard Webhooks secrets are 24 to 64 random bytes.
WEBHOOK_SECRET_BYTES = (24, 64)


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad value, and where it came from: a flag, an environment variable or a file's key."""

    setting: str
    source: Literal["flag", "env", "file"]
    where: str
    message: str

    def __str__(self) -> str:
        if self.source == "flag":
            return f"invalid value for {self.where}: {self.message}"
        if self.source == "file":
            return f"{self.where}: {self.message}"
        return f"invalid setting {self.where}: {self.message}"


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


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


# The headings of 'serve --help', each at the first setting of its group: a setting added
# after another joins that one's group.
SECTIONS: dict[str, str] = {
    "upstream_url": "Where the answers come from",
    "host": "Serving",
    "routes": "Model routing and retries (docs/openai-relay.md)",
    "connect_timeout": "The upstream connections",
    "sim_ttft": "The built-in simulator",
    "resume_grace": "Resumable streams (docs/resume.md)",
    "data_dir": "Jobs and webhooks (docs/jobs.md)",
    "api_keys": "Client keys, limits, CORS (docs/auth-and-limits.md)",
    "log_level": "Logs",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True, frozen=True
    )

    # --- where the answers come from ---
    upstream_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible API (…/v1): OpenAI, vLLM, Ollama, llama.cpp, "
                    "LM Studio… Unset: the built-in simulator.",
    )
    upstream_key: SecretStr | None = Field(
        default=None,
        # By name (populate_by_name) from flags and the file; from the environment only these two.
        validation_alias=AliasChoices("TOKENRELAY_UPSTREAM_KEY", "OPENAI_API_KEY"),
        description="API key sent to the upstream. Never sent to clients, never logged.",
    )
    model: str | None = Field(
        default=None, description="Model used when a request names none ('sim' on the simulator)."
    )

    # --- serving ---
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest request body accepted, in bytes.")
    heartbeat_interval: float = Field(
        default=15.0, gt=0, description="Seconds of silence before an SSE ': ping' comment."
    )
    send_timeout: float = Field(
        default=60.0, ge=0,
        description="Seconds one write to a client may wait while the client reads nothing; then the "
                    "client is dropped and its upstream request closed (0: wait forever).",
    )
    keepalive_timeout: int = Field(
        default=5, gt=0,
        description="Seconds an idle client connection stays open. Behind a load balancer that reuses "
                    "connections (AWS ALB: 60 s), make it longer than the balancer's idle timeout (docs/deploy.md).",
    )
    header_timeout: float = Field(
        default=10.0, gt=0,
        description="Seconds a client has to send a request's head (the request line and headers), counted "
                    "from the connection's first byte or from the end of the previous response; a new "
                    "connection that sends nothing is closed after this long too. Then 408 and close.",
    )
    body_timeout: float = Field(
        default=30.0, gt=0,
        description="Seconds a client has to send a whole request body once its headers arrived; then "
                    "408 and close.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="Largest request head (request line and headers) accepted, in bytes; larger: 431 and close.",
    )
    max_connections: int = Field(
        default=0, ge=0,
        description="Client connections (or requests) one process serves at once; more get a JSON 503 and "
                    "are closed. 0: half of the process's open-file limit (raised to its hard limit at "
                    "start-up), less 64 files of headroom: a stream needs a client and an upstream socket.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the service answers to (the Host header), comma-separated; '*': any; a "
                    "leading '.' allows subdomains. Empty: the address it listens on and localhost, or any "
                    "host when it listens on every address (0.0.0.0, ::). Refuses DNS rebinding.",
    )
    allow_public_without_keys: bool = Field(
        default=False,
        description="Let 'serve' listen on a public address without client keys, offering the upstream "
                    "(and its paid key) to anyone who can reach it. Without this it refuses to start.",
    )

    # --- model routing and retries ---
    routes: list[UpstreamRoute] = Field(
        default_factory=list,
        description="Models → upstreams, first match wins: [[routes]] in the TOML file, JSON in the "
                    'environment, e.g. [{"pattern": "claude-*", "kind": "anthropic", "url": '
                    '"https://api.anthropic.com/v1", "key_env": "ANTHROPIC_API_KEY"}]; kind is openai '
                    "(the default), anthropic or simulator.",
    )
    retries: int = Field(
        default=2, ge=0, le=10,
        description="Retries per upstream on connection errors, 429 and 5xx, before the first byte.",
    )
    retry_backoff: float = Field(default=0.25, ge=0, description="First retry delay (s); doubles each time.")
    retry_budget: float = Field(default=5.0, ge=0, description="Most seconds spent waiting to retry, per request.")

    # --- the upstream connections ---
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to connect to the upstream.")
    read_timeout: float = Field(
        default=120.0, gt=0, description="Longest silence from the upstream (s), before its first byte too."
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

    # --- jobs and webhooks ---
    # --- resumable streams ---
    resume_grace: float = Field(
        default=30.0, ge=0, le=3600,
        description="Seconds an /api/get-response answer goes on after its client left, so a reload can "
                    "resume it (GET /api/streams/{id}); then its upstream request is closed (0: at once).",
    )
    stream_ttl: float = Field(
        default=900.0, gt=0, description="Seconds a finished answer stays readable at GET /api/streams/{id}.",
    )
    stream_max_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0,
        description="Most bytes of text one streamed answer keeps; past it the answer ends with an error.",
    )
    stream_memory: int = Field(
        default=64 * 1024 * 1024, gt=0,
        description="Most bytes of text all finished answers together keep for resuming; the oldest go first.",
    )

    data_dir: Path = Field(
        default_factory=lambda: default_data_dir(),
        description="Where jobs and pending webhooks are kept (SQLite): tokenrelay under $XDG_DATA_HOME "
                    "(~/.local/share).",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis shared by several tokenrelay processes (redis://host:6379/0): the jobs' task "
                    "queue (run by 'tokenrelay worker'), the per-key limits and the resumable streams.",
    )
    redis_timeout: float = Field(
        default=2.0, gt=0,
        description="Seconds one Redis command may take before it counts as failed: a per-key limit then "
                    "lets the request through (docs/auth-and-limits.md), the jobs' API answers 503 with "
                    "Retry-After and a worker waits for Redis with a backoff (docs/jobs.md).",
    )
    job_concurrency: int = Field(default=16, gt=0, description="Jobs one process runs at once.")
    job_retention: int = Field(
        default=7 * 24 * 3600, ge=0, description="Seconds a job is kept after it was created (ended jobs in "
        "SQLite; the records' TTL in Redis); 0: kept forever.",
    )
    jobs_in_serve: bool = Field(
        default=True, description="With redis_url: 'tokenrelay serve' runs jobs from the queue too; false leaves "
        "them to 'tokenrelay worker' processes.",
    )
    job_heartbeat: int = Field(
        default=10, gt=0, description="Seconds without a worker's heartbeat before its job is run again."
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Standard Webhooks signing secret, 'whsec_' and base64 of 24 to 64 random bytes "
                    "('tokenrelay webhooks secret' makes one); required for jobs with a webhook_url.",
    )
    webhook_timeout: float = Field(default=10.0, gt=0, description="Seconds one delivery attempt may take.")
    webhook_max_attempts: int = Field(default=8, gt=0, description="Delivery attempts before a webhook fails.")
    webhook_backoff: float = Field(default=2.0, ge=0, description="Seconds before the first retry; doubles each time.")
    webhook_backoff_max: float = Field(default=900.0, ge=0, description="Longest wait between two attempts (s).")
    webhook_allow_private: bool = Field(
        default=False, description="Deliver to private, loopback and link-local addresses too."
    )

    # --- client keys, limits, CORS ---
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
        description="Origins that browsers may call the API from, comma-separated ('*': any). Empty: CORS off, "
                    "and requests that browsers mark as coming from another site are refused (403).",
    )
    failed_keys_per_minute: int = Field(
        default=30, ge=0,
        description="Requests with a missing or wrong client key one client address may make per minute; "
                    "more get 429 (0: no limit).",
    )

    # --- logs ---
    log_level: str = Field(default="info", description="critical, error, warning, info or debug.")
    log_json: bool = Field(default=False, description="Write logs as JSON lines.")
    log_prompts: bool = Field(default=False, description="Log each request's last user message.")

    @field_validator("upstream_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("upstream_key")
    @classmethod
    def _check_upstream_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (flaw := secret_flaw(value.get_secret_value())):
            raise ValueError(f"{flaw} (the key is not shown)")
        return value

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, routes: list[UpstreamRoute]) -> list[UpstreamRoute]:
        names = [r.label for r in routes]
        for route in routes:
            if route.kind != "simulator" and route.url is None:
                raise ValueError(f"route {route.label!r}: url is required for kind {route.kind!r}")
            if route.key_env:
                key = os.environ.get(route.key_env)
                if not key:
                    raise ValueError(f"route {route.label!r}: the environment variable {route.key_env} is not set")
                if flaw := secret_flaw(key):
                    raise ValueError(f"route {route.label!r}: the key in {route.key_env}: {flaw} "
                                     "(the key is not shown)")
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
        if not parse_keys(value.get_secret_value()):
            raise ValueError("no key given (unset it to leave the API open)")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
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
        secret = value.get_secret_value()
        if flaw := secret_flaw(secret):
            raise ValueError(f"{flaw} (the secret is not shown)")
        encoded = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError("must be a Standard Webhooks secret: 'whsec_' and base64; "
                             "make one with 'tokenrelay webhooks secret'") from None
        low, high = WEBHOOK_SECRET_BYTES
        if not low <= len(key) <= high:
            # A short key is guessable from the signatures it makes; receivers' libraries
            # may refuse a long one.
            raise ValueError(f"holds {len(key)} bytes; a Standard Webhooks secret holds {low} to {high} random "
                             "bytes: make one with 'tokenrelay webhooks secret'")
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

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _check_hosts(cls, value: Any) -> list[str]:
        items = value.split(",") if isinstance(value, str) else list(value or [])
        hosts = [str(item).strip().lower() for item in items if str(item).strip()]
        for host in hosts:
            if host != "*" and not re.fullmatch(r"\.?[a-z0-9_.:\[\]-]+", host):
                raise ValueError(f"{host!r} is not a host name such as chat.example.com (or '*')")
        return hosts

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
        """The model a request without one gets. With routes, only ``model`` counts: the routes
        need not serve the simulator's ``sim`` at all."""
        if self.routes:
            return self.model
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
        toml = _toml_source.get()
        return (init_settings, env_settings) if toml is None else (init_settings, env_settings, toml)


# The TOML file of the load_settings call in progress: the file is given per call, while
# pydantic-settings asks the class for its sources.
_toml_source: ContextVar[TomlConfigSettingsSource | None] = ContextVar("tokenrelay_toml_source", default=None)


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


def env_names(setting: str) -> tuple[str, ...]:
    """The environment variables that set ``setting``, strongest first."""
    alias = Settings.model_fields[setting].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(choice.upper() for choice in alias.choices if isinstance(choice, str))
    return (ENV_PREFIX + setting.upper(),)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``; None: not given), the environment and an
    optional TOML file, in that order of strength."""
    toml = _read_toml(Path(config_file)) if config_file is not None else None
    given = {k: v for k, v in overrides.items() if v is not None}
    token = _toml_source.set(toml)
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = tuple(_problem(err, given, toml) for err in exc.errors())
        raise SettingsError("\n".join(map(str, problems)), problems) from None
    except ValueError as exc:  # pydantic-settings' own: a list setting's value is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        if "error parsing value" not in str(exc) or not found or found.group(1) not in Settings.model_fields:
            raise
        problem = Problem(found.group(1), "env", env_names(found.group(1))[0],
                          "not valid JSON (list settings such as TOKENRELAY_ROUTES take JSON)")
        raise SettingsError(str(problem), (problem,)) from None
    finally:
        _toml_source.reset(token)


def _read_toml(path: Path) -> TomlConfigSettingsSource:
    # The TOML source skips what is not a file without a word; a --config that names
    # nothing must not start the service on its defaults.
    if not path.expanduser().exists():
        raise SettingsError(f"config file not found: {path}")
    if not path.expanduser().is_file():
        raise SettingsError(f"config file {path} is not a file")
    try:
        return TomlConfigSettingsSource(Settings, toml_file=path)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text") from None


def _problem(err: Any, given: Mapping[str, Any], toml: TomlConfigSettingsSource | None) -> Problem:
    loc = [str(part) for part in err["loc"]]
    key = loc[0] if loc else "?"
    setting = key if key in Settings.model_fields else next(
        (name for name in Settings.model_fields if key.upper() in env_names(name)), key)
    message = str(err["msg"]).removeprefix("Value error, ")
    nested = ".".join([setting, *loc[1:]])  # routes.0.kind: which entry
    if err["type"] == "extra_forbidden":
        close = _closest(setting, list(Settings.model_fields))
        message = "unknown setting" + (f"; did you mean {close}?" if close else "")
    if setting in given:
        return Problem(setting, "flag", "--" + setting.replace("_", "-"), message)
    present = {name.upper() for name in os.environ}
    for name in env_names(setting) if setting in Settings.model_fields else ():
        if name in present:
            where = name if len(loc) == 1 else f"{name} ({nested})"
            return Problem(setting, "env", where, message)
    path = toml.toml_file_path if toml is not None else "?"
    return Problem(setting, "file", f"config file {path}, {nested}", message)


def _closest(name: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(name, candidates, n=1)
    return close[0] if close else None


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``TOKENRELAY_*`` variable that tokenrelay does not read, naming the
    setting it was probably meant to be: a typo would otherwise leave the default in force."""
    environ = os.environ if environ is None else environ
    settings = {env: name for name in Settings.model_fields for env in env_names(name)}
    known = set(settings) | OTHER_ENV
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        # Compared without the prefix, which every candidate shares and which would make
        # any name look close to every setting.
        stems = {env.removeprefix(ENV_PREFIX): env for env in known if env.startswith(ENV_PREFIX)}
        close = _closest(upper.removeprefix(ENV_PREFIX), sorted(stems))
        hint = f"; did you mean {stems[close]}?" if close else ""
        warnings.append(f"{name} is not a tokenrelay setting and is ignored{hint}")
    return warnings


@dataclass(frozen=True, slots=True)
class SettingHelp:
    """One setting as ``serve --help`` lists it."""

    name: str
    env: tuple[str, ...]
    default: str
    description: str


def settings_help() -> list[tuple[str, list[SettingHelp]]]:
    """Every setting, in the sections of ``SECTIONS``, for help texts."""
    sections: list[tuple[str, list[SettingHelp]]] = []
    for name, field in Settings.model_fields.items():
        if name in SECTIONS or not sections:
            sections.append((SECTIONS.get(name, "Settings"), []))
        description = field.description or ""
        entry = _entry_fields(field)
        if entry:
            description += f" Each entry: {', '.join(entry)}."
        sections[-1][1].append(SettingHelp(name, env_names(name), default_text(field), description))
    return sections


def _entry_fields(field: FieldInfo) -> list[str]:
    """The keys of a list-of-tables setting such as ``routes``."""
    if get_origin(field.annotation) is list:
        (item,) = get_args(field.annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return list(item.model_fields)
    return []


def default_text(field: FieldInfo) -> str:
    """A setting's default as a user would write it."""
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    return str(value)
