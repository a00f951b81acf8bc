"""Configuration from the environment (or a `.env` file), validated once at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.limits import USER_ID_MAX
from service.text import USER_ID_PATTERN

DEV_SECRET_FILE = Path(".todo-api-dev-secret")

# Words of the values people paste from tutorials and templates, padded to the minimum length
# ("changeme-changeme-..."): a production secret holding one (letters and digits only,
# lower-cased) is refused. A random secret holds none of them.
_PLACEHOLDER_WORDS = (
    "changeme",
    "replaceme",
    "yoursecret",
    "betterauthsecret",
    "placeholder",
    "example",
)


def _is_placeholder(secret: str) -> bool:
    """Long enough, and still a template's: the length check alone let them through."""
    letters = re.sub(r"[^a-z0-9]", "", secret.lower())
    return any(word in letters for word in _PLACEHOLDER_WORDS)


class AppEnv(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class ConfigError(ValueError):
    """The configuration cannot run; the message names the variables to set."""


BETTER_AUTH_BASE_PATH = "/api/auth"
DEV_CORS_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")


def origin_of(url: str) -> str:
    """The URL's origin as JavaScript's `new URL(url).origin` writes it (lower case, no
    default port): what Better Auth puts in `iss` and `aud`."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = None
    if not parts.scheme or not host:
        raise ConfigError(f"not an absolute URL: {url!r}")
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_database_url(url: str) -> None:
    """Only PostgreSQL runs the audit trail's triggers and guards: refuse anything else."""
    scheme = url.split(":", 1)[0].lower().split("+", 1)[0]
    if scheme not in {"postgres", "postgresql"} or "://" not in url:
        raise ConfigError(
            "DATABASE_URL must be a postgresql:// or postgres:// URL (SQLite is not supported): "
            "point it at a PostgreSQL server"
        )
    try:
        make_url(url)
    except (ValueError, ArgumentError):
        # Not quoted: the URL carries the password (and a bad "port" may be part of it).
        raise ConfigError(
            "DATABASE_URL is not a valid URL (is its port a number, and the password "
            "percent-encoded?)"
        ) from None


def is_web_url(value: str) -> bool:
    """An http(s) URL with a host, and a port if any that is a number above 0."""
    parts = urlsplit(value)
    try:
        valid_port = parts.port is None or parts.port > 0
    except ValueError:  # not a number
        valid_port = False
    return parts.scheme in {"http", "https"} and bool(parts.hostname) and valid_port


# Read by the settings for their fields, and for the OTEL_* variables (export_otel_variables).
ENV_FILE = Path(".env")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # A rejected value (e.g. a too-short BETTER_AUTH_SECRET) must not be echoed in the error.
        hide_input_in_errors=True,
    )

    app_env: AppEnv = AppEnv.development

    # Database
    # Not in repr/str: the URL usually carries the database password. Unset: the commands that
    # need a database start the embedded PostgreSQL server (service.embedded).
    database_url: str | None = Field(default=None, repr=False)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_max_overflow: int = Field(default=10, ge=0, le=200)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    db_pool_recycle_seconds: int = Field(default=300, ge=1, le=300)
    db_connect_timeout_seconds: int = Field(default=5, ge=1, le=120)
    db_statement_timeout_ms: int = Field(default=10_000, ge=0, le=600_000)
    # How long a transaction may wait for its client's next statement (0: no bound). Longer
    # than any Python work inside one (signing a checkpoint of a million chains takes seconds).
    db_idle_in_transaction_timeout_ms: int = Field(default=60_000, ge=0, le=3_600_000)

    # Auth
    better_auth_secret: SecretStr | None = None
    better_auth_url: str | None = None
    better_auth_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=60)
    jwks_min_refetch_seconds: float = Field(default=30.0, ge=0, le=3600)
    # The key set is fetched again before use when older than this (a removed key is dropped).
    jwks_max_age_seconds: float = Field(default=300.0, gt=0, le=86_400)
    jwks_timeout_seconds: float = Field(default=3.0, gt=0, le=30)

    # HTTP
    # None: the Next.js dev server's origins in development, none otherwise.
    cors_origins: Annotated[list[str] | None, NoDecode] = None
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=10 * 1024 * 1024)
    # The request line and headers of one request, under `todo-api serve` (service.httpserver):
    # past it, 431. Real heads are a few KB (the largest part, a Better Auth JWT, is a few KB);
    # 64 KiB is what an AWS load balancer admits and 4 times the 16 KiB of Node and h11, so no
    # head a browser or a proxy in front lets through is refused, while the parser never holds
    # more than this of one head (unbounded, a 120 MB header stalled every request for seconds).
    max_request_head_bytes: int = Field(default=64 * 1024, ge=8 * 1024, le=1024 * 1024)
    # A head must be complete this long after the connection opened or the previous response,
    # else the connection is closed (408). A head is a packet or two: 20 s covers a phone on
    # a bad network, as Apache's mod_reqtimeout (20 s); a client that opens connections and
    # never finishes a head holds each for no longer. An idle kept-alive connection closes
    # sooner, at uvicorn's keep-alive timeout (5 s).
    request_head_timeout_seconds: float = Field(default=20.0, ge=1, le=300)
    # A body must be complete this long after its head, else 408 and the connection closed:
    # a client dribbling a byte every few seconds held its connection and its request for as
    # long as it kept on. 30 s takes the default 64 KiB body at 2.2 KB/s (17 kbit/s); a larger
    # MAX_BODY_BYTES needs a longer one (10 MiB in 30 s is 350 KB/s, in 300 s 35 KB/s).
    request_body_timeout_seconds: float = Field(default=30.0, ge=1, le=300)
    # TCP_USER_TIMEOUT of each connection (Linux): the kernel drops one whose sent data stays
    # unacknowledged this long. A client gone without closing (a lid shut, a network switched,
    # a NAT mapping dropped) otherwise holds its feed stream for Linux's ~15 minutes of
    # retransmissions, as the heartbeats fill no buffer. A live peer acks within seconds; 30 s
    # rides out a short outage such as a handover. 0: the kernel's (see service.httpserver).
    tcp_user_timeout_seconds: int = Field(default=30, ge=0, le=3600)  # whole seconds: not 0.5
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Rate limits (`limits` notation: "120/minute", "10/second"), counted in Redis when
    # REDIS_URL is set (shared by all instances), else in each process's memory.
    redis_url: SecretStr | None = None
    rate_limit_enabled: bool = True
    rate_limit_read: str = "300/minute"
    rate_limit_write: str = "120/minute"
    rate_limit_expensive: str = "10/minute"
    rate_limit_anonymous: str = "60/minute"
    rate_limit_key_prefix: str = Field(default="todo-api", min_length=1, max_length=64)
    # Longer than this, and the request is admitted without counting (fail open).
    rate_limit_redis_timeout_seconds: float = Field(default=0.5, gt=0, le=10)

    # Idempotency-Key: how long a key is honoured; expired keys are deleted in the background
    # every IDEMPOTENCY_PURGE_INTERVAL_SECONDS (by every instance, in small batches).
    idempotency_retention_seconds: int = Field(default=86_400, ge=1, le=30 * 86_400)
    idempotency_purge_interval_seconds: float = Field(default=300.0, gt=0, le=86_400)

    # Shutdown (SIGTERM): /readyz answers 503 for the drain period while requests are still
    # served, so a load balancer stops sending; then the listener closes and in-flight requests
    # get the timeout to finish. The container's stop grace period must exceed the sum of
    # these three (SHUTDOWN_FLUSH_SECONDS below included).
    shutdown_drain_seconds: float = Field(default=0.0, ge=0, le=60)
    shutdown_timeout_seconds: float = Field(default=20.0, gt=0, le=300)
    # Last, the spans and metrics still held are exported for at most this long (both at
    # once), so a collector that is down or hung cannot hold up the stop.
    shutdown_flush_seconds: float = Field(default=2.0, ge=0, le=60)

    # Change feed (service.events). Its LISTEN connection needs a direct (session) connection:
    # behind a transaction pooler such as Neon's `-pooler` endpoint, set the direct URL here.
    feed_database_url: str | None = Field(default=None, repr=False)
    # Limits per worker process
    feed_max_streams_per_user: int = Field(default=10, ge=1, le=1000)
    feed_max_streams_per_worker: int = Field(default=5000, ge=1, le=100_000)
    feed_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    feed_send_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    feed_ticket_ttl_seconds: int = Field(default=30, ge=1, le=300)

    # Reminders (service.reminders): every worker process polls for due reminders and fires
    # them in batches (SKIP LOCKED shares them out); one later than the grace period is late.
    reminders_enabled: bool = True
    reminder_poll_seconds: float = Field(default=5.0, gt=0, le=3600)
    reminder_batch_size: int = Field(default=20, ge=1, le=500)
    reminder_grace_seconds: float = Field(default=300.0, ge=0, le=30 * 86_400)
    # The actor of `reminder.fired` audit events: the service, not a user.
    reminder_actor_id: str = Field(
        default="system:reminders",
        min_length=1,
        max_length=USER_ID_MAX,
        pattern=USER_ID_PATTERN,
    )

    # Observability
    # Prometheus metrics: on the API's port at /metrics, or on METRICS_PORT (never behind auth).
    metrics_enabled: bool = False
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str | None = None  # json | console; json unless development
    jaeger_ui_url: str | None = None

    # Audit checkpoints (see audit/checkpoint.py)
    audit_signing_key: SecretStr | None = Field(default=None, repr=False)
    audit_signing_key_file: Path | None = None
    audit_checkpoint_interval_seconds: int = Field(default=0, ge=0, le=7 * 86400)
    audit_checkpoint_dir: Path | None = None

    @field_validator(
        "database_url",
        "feed_database_url",
        "audit_signing_key",
        "audit_signing_key_file",
        "audit_checkpoint_dir",
        "jaeger_ui_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`VAR=`, as compose and `.env` files write a variable left blank, means unset: not a
        URL to refuse, nor the path "." (the working directory). Not for every setting
        (`env_ignore_empty`): an empty BETTER_AUTH_SECRET is refused, lest a blank secret
        fall back to the generated development one."""
        return None if value == "" else value

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: list[str] | None) -> list[str] | None:
        """Each as a browser writes `Origin`, or `*`: anything else never matches."""
        for origin in value or ():
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if "://" not in origin or not parts.netloc:
                raise ValueError(
                    f"{origin!r} is not an origin: write it with its scheme, "
                    f"e.g. https://{origin.split('://')[-1].strip('/')} or "
                    f"http://{origin.split('://')[-1].strip('/')}"
                )
            if parts.path or parts.query or parts.fragment:
                raise ValueError(
                    f"{origin!r}: an origin is a scheme and host without a path, "
                    f"e.g. {parts.scheme}://{parts.netloc}"
                )
            if origin != origin.lower():
                raise ValueError(
                    f"{origin!r}: browsers send the origin in lower case, write {origin.lower()}"
                )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        """Addresses or networks: uvicorn takes anything else for a host name that a client
        address never equals, and believes no proxy at all."""
        for entry in value:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry)
            except ValueError:
                try:
                    network = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not an IP address or network") from None
                raise ValueError(
                    f"{entry!r} has host bits set: write the network, {network}"
                ) from None
        return value

    @field_validator("better_auth_url")
    @classmethod
    def _check_better_auth_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not is_web_url(value):
            raise ConfigError(
                f"BETTER_AUTH_URL must be the frontend's URL, e.g. http://localhost:3000 "
                f"(got {value!r})"
            )
        return value

    @field_validator("jaeger_ui_url")
    @classmethod
    def _check_jaeger_ui_url(cls, value: str | None) -> str | None:
        """The base of every audit event's `trace_url`: `localhost:16686` made links that
        lead nowhere. Not repeated in the error (it may carry credentials)."""
        if value is None:
            return None
        if not is_web_url(value):
            raise ValueError(
                "JAEGER_UI_URL must be the Jaeger UI's http:// or https:// URL, e.g. "
                "http://localhost:16686"
            )
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            # Every user's audit events carry the link: the password would be theirs too.
            raise ValueError(
                "JAEGER_UI_URL must not carry credentials (user:password@): every audit event "
                "a user reads carries it, as trace_url"
            )
        return value

    @model_validator(mode="after")
    def _check_jwks_ages(self) -> Settings:
        """The key set cannot be fetched more often than the refetch interval allows."""
        if self.jwks_max_age_seconds < self.jwks_min_refetch_seconds:
            raise ConfigError(
                f"JWKS_MAX_AGE_SECONDS ({self.jwks_max_age_seconds:g}) must be at least "
                f"JWKS_MIN_REFETCH_SECONDS ({self.jwks_min_refetch_seconds:g})"
            )
        return self

    @model_validator(mode="after")
    def _check_better_auth_path(self) -> Settings:
        """A path in BETTER_AUTH_URL used to double up in the JWKS URL (503 forever)."""
        if not self.better_auth_url or self.better_auth_jwks_url:
            return self
        parts = urlsplit(self.better_auth_url)
        path = parts.path.rstrip("/")
        if path and path != BETTER_AUTH_BASE_PATH:
            raise ConfigError(
                f"BETTER_AUTH_URL must be the origin Better Auth runs on, without a path "
                f"(got path {parts.path!r}): set BETTER_AUTH_URL={parts.scheme}://{parts.netloc}"
                f" and, if Better Auth is not mounted at {BETTER_AUTH_BASE_PATH}, "
                f"BETTER_AUTH_JWKS_URL to its /jwks URL"
            )
        return self

    @field_validator(
        "rate_limit_read", "rate_limit_write", "rate_limit_expensive", "rate_limit_anonymous"
    )
    @classmethod
    def _check_rate(cls, value: str) -> str:
        from limits import parse

        try:
            limit = parse(value)
        except ValueError:
            raise ValueError(
                f"not a rate limit: {value!r} (write it like 120/minute or 10/second)"
            ) from None
        if limit.amount < 1:
            raise ValueError(
                f"{value!r} refuses every request; to turn the limits off, set "
                "RATE_LIMIT_ENABLED=false"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("redis://", "rediss://")):
            raise ValueError("REDIS_URL must start with redis:// or rediss://")
        return value

    @field_validator("database_url", "feed_database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_database_url(value)
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str | None) -> str | None:
        if value is not None and value not in {"json", "console"}:
            raise ValueError("LOG_FORMAT must be json or console")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _check_audit_signing(self) -> Settings:
        if self.audit_signing_key is not None and self.audit_signing_key_file is not None:
            raise ConfigError("set AUDIT_SIGNING_KEY or AUDIT_SIGNING_KEY_FILE, not both")
        if self.audit_checkpoint_interval_seconds and not self.has_audit_signing_key:
            raise ConfigError(
                "AUDIT_CHECKPOINT_INTERVAL_SECONDS needs a signing key: set AUDIT_SIGNING_KEY "
                "or AUDIT_SIGNING_KEY_FILE"
            )
        return self

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.app_env is not AppEnv.production:
            return self
        if self.better_auth_secret is None and not self.better_auth_url:
            raise ConfigError(
                "APP_ENV=production needs BETTER_AUTH_SECRET (HS256 tokens) or "
                "BETTER_AUTH_URL (tokens from Better Auth's JWT plugin), or both"
            )
        if self.better_auth_secret is not None:
            raw = self.better_auth_secret.get_secret_value()
            if len(raw) < 32 or _is_placeholder(raw):
                raise ConfigError(
                    "BETTER_AUTH_SECRET must be at least 32 characters and not a placeholder "
                    "in production (generate one with: openssl rand -base64 32)"
                )
        return self

    # Derived values -------------------------------------------------------

    @property
    def has_audit_signing_key(self) -> bool:
        return self.audit_signing_key is not None or self.audit_signing_key_file is not None

    @property
    def idempotency_retention(self) -> timedelta:
        return timedelta(seconds=self.idempotency_retention_seconds)

    @property
    def effective_log_format(self) -> str:
        if self.log_format:
            return self.log_format
        return "console" if self.app_env is AppEnv.development else "json"

    @property
    def better_auth_url_has_base_path(self) -> bool:
        """BETTER_AUTH_URL ends in /api/auth: a common slip, corrected (and warned about)."""
        if not self.better_auth_url:
            return False
        return urlsplit(self.better_auth_url).path.rstrip("/") == BETTER_AUTH_BASE_PATH

    @property
    def jwks_url(self) -> str | None:
        if self.better_auth_jwks_url:
            return self.better_auth_jwks_url
        if self.better_auth_url:
            return origin_of(self.better_auth_url) + BETTER_AUTH_BASE_PATH + "/jwks"
        return None

    @property
    def effective_cors_origins(self) -> list[str]:
        if self.cors_origins is not None:
            return self.cors_origins
        return list(DEV_CORS_ORIGINS) if self.app_env is AppEnv.development else []

    @property
    def expected_issuer(self) -> str | None:
        if self.jwt_issuer:
            return self.jwt_issuer
        return origin_of(self.better_auth_url) if self.better_auth_url else None

    @property
    def expected_audience(self) -> str | None:
        if self.jwt_audience:
            return self.jwt_audience
        return origin_of(self.better_auth_url) if self.better_auth_url else None

    @property
    def needs_dev_secret(self) -> bool:
        return (
            self.app_env is AppEnv.development
            and self.better_auth_secret is None
            and not self.better_auth_url
        )

    def with_dev_secret(self, path: Path = DEV_SECRET_FILE) -> Settings:
        """In development with no auth configured, use a generated HS256 secret.

        It is kept in a local file so that `todo-api dev-token` (another process) signs
        tokens the running server accepts.
        """
        if not self.needs_dev_secret:
            return self
        if not path.exists():
            _create_dev_secret(path)
        secret = path.read_text(encoding="utf-8").strip()
        return self.model_copy(update={"better_auth_secret": SecretStr(secret)})


def _create_dev_secret(path: Path) -> None:
    """Written whole, readable by its owner only, under a name of this process's, then linked
    into place: processes starting at once (`make run`, `dev-token`) each made one, and read
    another's, or an empty file, and some refused the others' tokens."""
    draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        # Fails if the file is there: the first to link it made the secret for all.
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def export_otel_variables(env_file: Path = ENV_FILE) -> None:
    """The `OTEL_*` lines of the `.env` file into the process's environment, where the
    OpenTelemetry SDK (and observability.otel_env) read them, and uvicorn's workers inherit
    them: the settings read the file for their own fields only, so an OTLP endpoint or a
    sampler written there was ignored without a word. One set in the environment wins, as
    for every setting."""
    if not env_file.is_file():
        return
    # Read as the settings read it (case aside: the names come back in lower case).
    source = DotEnvSettingsSource(Settings, env_file=env_file, env_file_encoding="utf-8")
    for key, value in source.env_vars.items():
        name = key.upper()
        if name.startswith("OTEL_") and value is not None and name not in os.environ:
            os.environ[name] = value


# The entry-point group the OpenTelemetry API loads OTEL_PROPAGATORS' names from.
_PROPAGATOR_GROUP = "opentelemetry_propagator"


def check_propagators() -> None:
    """Raise ConfigError if OTEL_PROPAGATORS names a propagator no installed package provides
    (`b3`, `xray`), or an empty one. The API loads them when it is first imported, and raised
    there: every command that imports it (serve, migrate) stopped with a traceback. Read as
    it reads them: in order, up to a `none` (any case), which ends the list."""
    configured = os.environ.get("OTEL_PROPAGATORS")
    if not configured:
        return
    installed = {entry.name for entry in entry_points(group=_PROPAGATOR_GROUP)}
    for name in (part.strip() for part in configured.split(",")):
        if name.lower() == "none":
            return
        if name not in installed:
            raise ConfigError(
                f"OTEL_PROPAGATORS names {name!r}, which is not installed: use "
                f"{', '.join(sorted(installed))} or none (comma-separated, no empty entry)"
            )


@lru_cache
def get_settings() -> Settings:
    export_otel_variables()
    # Here, before anything imports OpenTelemetry (the `.env` file's OTEL_* are in by now).
    check_propagators()
    return Settings()
