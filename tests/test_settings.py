"""Configuration from the environment: database URLs, production guards, auth defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from service.database import Database, build_engine, normalize_database_url, safe_url
from service.settings import AppEnv, Settings, get_settings
from tests.support import clean_environ

REPO = Path(__file__).resolve().parent.parent

GOOD_SECRET = "k3Qb9Z0rV8yWm2Lx7Pq4Tn6Hs1Jd5Fg0Ae8Uc3Yi"  # 41 characters, not a placeholder
# Each test sets exactly the variables it is about.
pytestmark = pytest.mark.usefixtures("clean_env")


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


# DATABASE_URL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "driver", "query"),
    [
        ("postgresql://u:p@db.example.com:5432/app", "postgresql+psycopg2", {}),
        (
            "postgres://u:p@ep-x.neon.tech/neondb?sslmode=require",
            "postgresql+psycopg2",
            {"sslmode": "require"},
        ),
        (
            "postgres://u:p@h/db?sslmode=verify-full&channel_binding=require&application_name=x",
            "postgresql+psycopg2",
            {"sslmode": "verify-full", "channel_binding": "require", "application_name": "x"},
        ),
        (
            "postgresql+psycopg2://u@h/db?sslmode=require",
            "postgresql+psycopg2",
            {"sslmode": "require"},
        ),
    ],
)
def test_database_url_forms_are_accepted_and_normalized(
    monkeypatch: pytest.MonkeyPatch, raw: str, driver: str, query: dict[str, str]
) -> None:
    """What Neon/Heroku print works as is; the driver is pinned and query params are kept."""
    settings = from_env(monkeypatch, DATABASE_URL=raw)
    assert settings.database_url == raw
    url = normalize_database_url(settings.database_url)
    assert url.drivername == driver
    assert dict(url.query) == query
    engine = build_engine(settings)  # no connection is made
    try:
        assert engine.url.drivername == driver
        assert dict(engine.url.query) == query
        assert engine.url.database == url.database
    finally:
        engine.dispose()


def test_options_in_the_database_url_are_kept_beside_the_timeouts(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """`?options=` (Neon's `endpoint=...` for a client without SNI, a `search_path`) was
    replaced by the timeouts' startup option, silently: the URL's options and the timeouts
    both reach the server, on the pool's connections and on the feed's listener."""
    # Added to the URL's query (the embedded server's has one: its socket directory).
    url = sa.make_url(database_url).update_query_dict(
        {"options": "-c search_path=rev_ops_schema,public"}
    )
    settings = from_env(
        monkeypatch,
        DATABASE_URL=url.render_as_string(hide_password=False),
        DB_STATEMENT_TIMEOUT_MS="4321",
    )
    database = Database.from_settings(settings)
    try:
        with database.engine.connect() as connection:
            search_path = connection.execute(sa.text("SHOW search_path")).scalar_one()
            timeout = connection.execute(sa.text("SHOW statement_timeout")).scalar_one()
        assert (search_path, timeout) == ("rev_ops_schema,public", "4321ms")
        listener = database.dedicated_connection(settings, "todo-api-test")
        try:
            with listener.cursor() as cursor:
                cursor.execute("SHOW search_path")
                assert cursor.fetchone() == ("rev_ops_schema,public",)
                cursor.execute("SHOW statement_timeout")  # a connection that only waits
                assert cursor.fetchone() == ("0",)
        finally:
            listener.close()
    finally:
        database.dispose()


@pytest.mark.parametrize(
    "raw", ["mysql://u:p@h/db", "mongodb://h/db", "not a url", "http://example.com/db"]
)
def test_other_database_urls_are_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, DATABASE_URL=raw)
    assert "DATABASE_URL" in str(info.value)


@pytest.mark.parametrize("raw", ["0.5", "-1", "3601", "thirty"])
def test_a_tcp_user_timeout_is_whole_seconds_within_bounds(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """A fraction of a second would drop connections at any ordinary retransmission."""
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, TCP_USER_TIMEOUT_SECONDS=raw)
    assert "tcp_user_timeout_seconds" in str(info.value)
    assert from_env(monkeypatch, TCP_USER_TIMEOUT_SECONDS="0").tcp_user_timeout_seconds == 0


@pytest.mark.parametrize("raw", ["0", "0.5", "301", "never"])
def test_a_request_body_timeout_is_within_bounds(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    """Bounded as the head's limit (1-300 s): under a second, a body a packet late would be
    refused."""
    assert from_env(monkeypatch).request_body_timeout_seconds == 30
    assert from_env(monkeypatch, REQUEST_BODY_TIMEOUT_SECONDS="1").request_body_timeout_seconds == 1
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, REQUEST_BODY_TIMEOUT_SECONDS=raw)
    assert "request_body_timeout_seconds" in str(info.value)


@pytest.mark.parametrize("raw", ["sqlite:///./todo.db", "sqlite:////tmp/absolute.db", "sqlite://"])
def test_sqlite_urls_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, DATABASE_URL=raw)
    assert "SQLite is not supported" in str(info.value)


def test_an_empty_url_key_or_path_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`VAR=` as compose and `.env` files write a blank one: an empty DATABASE_URL was refused
    as not PostgreSQL, an empty path was ".", the working directory."""
    blank = ("DATABASE_URL", "FEED_DATABASE_URL", "AUDIT_SIGNING_KEY", "AUDIT_SIGNING_KEY_FILE")
    settings = from_env(monkeypatch, **dict.fromkeys((*blank, "AUDIT_CHECKPOINT_DIR"), ""))
    assert settings.database_url is settings.feed_database_url is None
    assert settings.audit_signing_key is settings.audit_signing_key_file is None
    assert settings.audit_checkpoint_dir is None


# Production guards --------------------------------------------------------------------


def test_production_without_auth_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, APP_ENV="production")
    message = str(info.value)
    assert "BETTER_AUTH_SECRET" in message and "BETTER_AUTH_URL" in message


@pytest.mark.parametrize(
    "secret",
    [
        "short",
        "x" * 31,
        "changeme",
        "secret",
        "your-better-auth-secret",
        "  ",
        # Placeholders padded past the length check.
        "changeme-changeme-changeme-changeme-123",
        "your-secret-key-goes-here-0123456789abcdef",
        "REPLACE_ME_WITH_A_REAL_SECRET_OF_32_CHARS",
        "better-auth-secret-1234567890123456789",
    ],
)
def test_production_refuses_short_or_placeholder_secret(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, APP_ENV="production", BETTER_AUTH_SECRET=secret)
    message = str(info.value)
    assert "BETTER_AUTH_SECRET" in message
    if secret.strip():
        assert secret not in message  # the rejected value is not echoed into logs


@pytest.mark.parametrize(
    "env",
    [
        {"BETTER_AUTH_SECRET": GOOD_SECRET},
        {"BETTER_AUTH_URL": "https://auth.example.com"},
        {"BETTER_AUTH_SECRET": GOOD_SECRET, "BETTER_AUTH_URL": "https://auth.example.com"},
    ],
)
def test_production_starts_with_auth_configured(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    assert from_env(monkeypatch, APP_ENV="production", **env).app_env is AppEnv.production


def test_development_accepts_a_short_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strength check is a production guard, not a development obstacle."""
    settings = from_env(monkeypatch, APP_ENV="development", BETTER_AUTH_SECRET="dev")
    assert settings.better_auth_secret is not None


def test_secret_is_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(
        monkeypatch,
        BETTER_AUTH_SECRET=GOOD_SECRET,
        DATABASE_URL="postgresql://app:db-password-123@db.example.com/app",
    )
    assert settings.better_auth_secret is not None
    assert settings.better_auth_secret.get_secret_value() == GOOD_SECRET
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert GOOD_SECRET not in text
        assert "db-password-123" not in text
    assert GOOD_SECRET not in settings.model_dump_json()


# Auth defaults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "origin"),
    [
        ("https://auth.example.com", "https://auth.example.com"),
        ("https://auth.example.com/", "https://auth.example.com"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("https://example.com:8443/api/auth/", "https://example.com:8443"),
        # As JavaScript's `new URL(base).origin` writes it: lower case, no default port.
        ("https://app.example.com:443/", "https://app.example.com"),
        ("HTTP://LocalHost:3917", "http://localhost:3917"),
        ("http://Example.COM:80", "http://example.com"),
        ("http://[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_issuer_and_audience_default_to_the_origin(
    monkeypatch: pytest.MonkeyPatch, base: str, origin: str
) -> None:
    """Better Auth puts the origin of its base URL in `iss` and `aud`."""
    settings = from_env(monkeypatch, BETTER_AUTH_URL=base)
    assert settings.expected_issuer == origin
    assert settings.expected_audience == origin


def test_explicit_issuer_and_audience_win(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(
        monkeypatch,
        BETTER_AUTH_URL="https://auth.example.com",
        JWT_ISSUER="https://issuer.example.com",
        JWT_AUDIENCE="todo-api",
    )
    assert settings.expected_issuer == "https://issuer.example.com"
    assert settings.expected_audience == "todo-api"


def test_no_auth_url_means_no_jwks(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, BETTER_AUTH_SECRET=GOOD_SECRET)
    assert settings.jwks_url is None
    assert settings.expected_issuer is None and settings.expected_audience is None


@pytest.mark.parametrize(
    ("base", "jwks"),
    [
        ("https://auth.example.com", "https://auth.example.com/api/auth/jwks"),
        ("https://auth.example.com/", "https://auth.example.com/api/auth/jwks"),
    ],
)
def test_jwks_url_defaults_under_better_auth_url(
    monkeypatch: pytest.MonkeyPatch, base: str, jwks: str
) -> None:
    assert from_env(monkeypatch, BETTER_AUTH_URL=base).jwks_url == jwks


def test_jwks_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(
        monkeypatch,
        BETTER_AUTH_URL="https://auth.example.com",
        BETTER_AUTH_JWKS_URL="https://keys.example.com/.well-known/jwks.json",
    )
    assert settings.jwks_url == "https://keys.example.com/.well-known/jwks.json"
    assert settings.expected_issuer == "https://auth.example.com"


@pytest.mark.parametrize(("value", "ok"), [("0", True), ("60", True), ("61", False), ("-1", False)])
def test_leeway_is_at_most_60_seconds(
    monkeypatch: pytest.MonkeyPatch, value: str, ok: bool
) -> None:
    if ok:
        assert from_env(monkeypatch, JWT_LEEWAY_SECONDS=value).jwt_leeway_seconds == int(value)
    else:
        with pytest.raises(ValidationError):
            from_env(monkeypatch, JWT_LEEWAY_SECONDS=value)


def test_cors_origins_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, CORS_ORIGINS="https://a.example, https://b.example ,")
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost:3000", "http://localhost:3000"),
        ("http://localhost:3000/", "without a path"),
        ("https://app.example/login", "without a path"),
        ("app.example", "https://app.example"),
    ],
)
def test_cors_origins_must_be_origins(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    """A browser sends `Origin: http://localhost:3000`: an entry written otherwise would
    never match it, and every call from the frontend would fail CORS."""
    with pytest.raises(ValidationError) as excinfo:
        from_env(monkeypatch, CORS_ORIGINS=f"https://ok.example,{value}")
    assert message in str(excinfo.value)


def test_cors_origins_may_be_any_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_env(monkeypatch, CORS_ORIGINS="*").cors_origins == ["*"]
    # Apps in a webview and browser extensions have origins of their own schemes.
    apps = "capacitor://localhost,tauri://localhost,http://[::1]:3000"
    assert from_env(monkeypatch, CORS_ORIGINS=apps).cors_origins == apps.split(",")


def test_cors_origins_in_upper_case_would_never_match(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as excinfo:
        from_env(monkeypatch, CORS_ORIGINS="HTTP://LOCALHOST:3000")
    assert "write http://localhost:3000" in str(excinfo.value)


def test_the_jwks_max_age_is_at_least_the_refetch_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A set older than the maximum age could not be fetched again before the interval."""
    with pytest.raises(ValidationError) as excinfo:
        from_env(monkeypatch, JWKS_MAX_AGE_SECONDS="10", JWKS_MIN_REFETCH_SECONDS="30")
    assert "JWKS_MAX_AGE_SECONDS (10) must be at least JWKS_MIN_REFETCH_SECONDS (30)" in str(
        excinfo.value
    )


@pytest.mark.parametrize(
    "value", ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8", "*", "127.0.0.1, 10.1.0.0/16"]
)
def test_trusted_proxies_are_addresses_or_networks(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    assert from_env(monkeypatch, TRUSTED_PROXIES=value).trusted_proxies


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1/8", "127.0.0.0/8"),  # host bits set: uvicorn took it for a host name
        ("not-an-ip", "not an IP address or network"),
        ("10.0.0.300", "not an IP address or network"),
    ],
)
def test_trusted_proxies_that_would_never_match_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    with pytest.raises(ValidationError) as excinfo:
        from_env(monkeypatch, TRUSTED_PROXIES=value)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("value", ["0/minute", "0/second"])
def test_a_rate_limit_of_zero_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """It refused every request; RATE_LIMIT_ENABLED=false is how limits are turned off."""
    with pytest.raises(ValidationError) as excinfo:
        from_env(monkeypatch, RATE_LIMIT_READ=value)
    assert "RATE_LIMIT_ENABLED=false" in str(excinfo.value)


def test_jwks_max_age_defaults_to_five_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_env(monkeypatch).jwks_max_age_seconds == 300
    assert from_env(monkeypatch, JWKS_MAX_AGE_SECONDS="60").jwks_max_age_seconds == 60
    with pytest.raises(ValidationError, match="jwks_max_age_seconds"):
        from_env(monkeypatch, JWKS_MAX_AGE_SECONDS="0")


def test_a_password_given_as_a_query_parameter_is_masked_too() -> None:
    """libpq takes `?password=`; the URL is logged by `migrate`."""
    url = normalize_database_url("postgresql://u@db.example/todo?password=s3cr3t&sslmode=require")
    shown = safe_url(url)
    assert "s3cr3t" not in shown
    assert "password=***" in shown and "sslmode=require" in shown
    assert "s3cr3t" not in safe_url(normalize_database_url("postgresql://u:s3cr3t@db.example/x"))


def test_otel_variables_of_the_env_file_reach_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where the OpenTelemetry SDK reads them (uvicorn's workers inherit them); one set in the
    environment wins, as for every setting."""
    (tmp_path / ".env").write_text(
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://collector.internal:4318\n"
        "OTEL_SERVICE_NAME=from-the-file\nLOG_FORMAT=json\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-the-environment")
    # Set, then removed: so recorded, and what the file puts there is undone after (a
    # delenv of a variable that is not set records nothing, and it stayed for every test).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    get_settings.cache_clear()
    try:
        assert get_settings().log_format == "json"
    finally:
        get_settings.cache_clear()
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://collector.internal:4318"
    assert os.environ["OTEL_SERVICE_NAME"] == "from-the-environment"
    assert "LOG_FORMAT" not in os.environ  # the settings' own are read from the file as before


@pytest.mark.parametrize("raw", ["localhost:16686", "jaeger:16686/", "ftp://jaeger", "http://"])
def test_a_jaeger_ui_url_that_is_no_web_url_is_refused(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """Every audit event's `trace_url` was built from it: `localhost:16686/trace/...`, a link
    that leads nowhere, with nothing said at start."""
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, JAEGER_UI_URL=raw)
    assert "JAEGER_UI_URL" in str(info.value).upper()
    for good in ("http://localhost:16686", "https://tools.example.com/jaeger/"):
        assert from_env(monkeypatch, JAEGER_UI_URL=good).jaeger_ui_url == good
    assert from_env(monkeypatch, JAEGER_UI_URL="").jaeger_ui_url is None


@pytest.mark.parametrize(
    "raw",
    ["https://ops:hunter2@jaeger.example.com", "http://hunter2@jaeger:16686/", "http://:hunter2@j"],
)
def test_a_jaeger_ui_url_with_credentials_is_refused_without_quoting_them(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """Every user's audit events carry `trace_url` built from it (the feed, a task's history,
    the change feed): a Jaeger UI behind basic auth, its password in the URL, gave that
    password to every user."""
    with pytest.raises(ValidationError) as info:
        from_env(monkeypatch, JAEGER_UI_URL=raw)
    assert "JAEGER_UI_URL" in str(info.value).upper()
    assert "credentials" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_processes_starting_at_once_share_one_dev_secret(tmp_path: Path) -> None:
    """`make run` and `todo-api dev-token` (or several workers) may make the secret at the same
    moment: each must end up with the one kept in the file, which only its owner may read."""
    start = time.time() + 3
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from service.settings import Settings\n"
        "settings = Settings(_env_file=None, app_env='development')\n"
        f"time.sleep(max(0, {start} - time.time()))\n"
        "made = settings.with_dev_secret(Path(sys.argv[1]))\n"
        "print(made.better_auth_secret.get_secret_value())\n"
    )
    path = tmp_path / "secret"
    env = clean_environ(PYTHONPATH=str(REPO))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    secrets_made = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert secrets_made == {path.read_text(encoding="utf-8").strip()}
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [path]
