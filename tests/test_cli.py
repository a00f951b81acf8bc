"""The `todo-api` command, run as a real subprocess the way a developer runs it."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.checkpoint import sign_leaves
from audit.signing import SigningKey
from service.app import create_app
from service.cli import alembic_config, build_parser, check_requests_connect
from service.database import Database, build_engine
from service.schema import _unchecked, revisions
from service.settings import Settings
from service.tasks.models import SEARCH_MAX
from tests.audit_helpers import scratch_database
from tests.jwt_helpers import random_id
from tests.reliability_helpers import (
    StartupParameterRefusingProxy,
    proxied_url,
    server_address,
    wait_until,
)
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, ApiUser, MakeUser, clean_environ, free_port

TODO_API = Path(sys.executable).parent / "todo-api"


def run(tmp_path: Path, *args: str | bytes, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `todo-api` in `tmp_path` (no .env there), with only the app variables in `env`."""
    environment = clean_environ(OTEL_SDK_DISABLED="true", **env)
    return subprocess.run(
        [str(TODO_API), *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dev_token_is_accepted_by_the_app(
    tmp_path: Path, client: TestClient, database: Database
) -> None:
    user_id = random_id()
    result = run(
        tmp_path,
        "dev-token",
        user_id,
        "--email",
        "dev@example.com",
        "--name",
        "Dev User",
        "--ttl",
        "120",
        BETTER_AUTH_SECRET=TEST_SECRET,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token

    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == user_id
    assert (claims["email"], claims["name"]) == ("dev@example.com", "Dev User")
    assert claims["exp"] - claims["iat"] == 120

    headers = {"Authorization": f"Bearer {token}"}
    created = client.post(f"/api/{user_id}/tasks", json={"title": "from the CLI"}, headers=headers)
    assert created.status_code == 201
    assert client.get(f"/api/{user_id}/tasks", headers=headers).json() == [created.json()]
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": user_id}
        ).one()
    assert tuple(row) == ("dev@example.com", "Dev User")


@pytest.mark.parametrize("secret", [TEST_SECRET + "\n", " " + TEST_SECRET, TEST_SECRET + " "])
def test_a_secret_with_blanks_around_it_is_refused_without_showing_it(
    tmp_path: Path, database_url: str, secret: str
) -> None:
    """`openssl rand -base64 32 > file`, mounted as the variable, ends in a newline: the
    frontend signs with the secret without it, and every token was a 401."""
    result = run(tmp_path, "dev-token", "alice", BETTER_AUTH_SECRET=secret)
    assert (result.returncode, result.stdout) == (2, "")
    served = run_serve(
        tmp_path, "--no-migrate", DATABASE_URL=database_url, BETTER_AUTH_SECRET=secret
    )
    assert served.returncode == 2, served.stderr
    for stderr in (result.stderr, served.stderr):
        [line] = stderr.strip().splitlines()
        assert line.startswith("todo-api: configuration error: BETTER_AUTH_SECRET "), line
        assert TEST_SECRET not in stderr


def test_no_dev_token_for_the_services_own_actor(tmp_path: Path) -> None:
    result = run(tmp_path, "dev-token", "system:reminders", BETTER_AUTH_SECRET=TEST_SECRET)
    assert (result.returncode, result.stdout) == (2, "")
    assert "REMINDER_ACTOR_ID" in result.stderr


def test_dev_token_signed_with_another_secret_is_rejected(
    tmp_path: Path, client: TestClient
) -> None:
    user_id = random_id()
    result = run(tmp_path, "dev-token", user_id, BETTER_AUTH_SECRET="another-" + "z" * 40)
    assert result.returncode == 0, result.stderr
    resp = client.get(
        f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {result.stdout.strip()}"}
    )
    assert resp.status_code == 401


def test_dev_token_with_an_empty_secret_is_a_configuration_error(tmp_path: Path) -> None:
    """It was PyJWT's traceback ("HMAC key must not be empty") and exit 1; `serve` says this."""
    result = run(tmp_path, "dev-token", "alice", BETTER_AUTH_SECRET="")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "todo-api: configuration error: BETTER_AUTH_SECRET must not be empty: set a secret, or "
        "unset it\n"
    )


def test_migrate_creates_the_tables_on_an_empty_database(tmp_path: Path, database_url: str) -> None:
    name = f"todo_cli_{os.getpid()}_{secrets.token_hex(3)}"
    server = sa.make_url(database_url)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    try:
        result = run(tmp_path, "migrate", DATABASE_URL=url, BETTER_AUTH_SECRET=TEST_SECRET)
        assert result.returncode == 0, result.stderr
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert {"users", "tasks", "audit_events", "audit_chain_heads", "alembic_version"} <= (
                tables
            )
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            columns = {column["name"] for column in sa.inspect(conn).get_columns("tasks")}
            assert {"id", "user_id", "title", "description", "completed", "created_at"} <= columns

        again = run(tmp_path, "migrate", DATABASE_URL=url, BETTER_AUTH_SECRET=TEST_SECRET)
        assert again.returncode == 0, again.stderr
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_sqlite_url_is_refused_at_start(tmp_path: Path) -> None:
    for command in (["serve", "--port", "1"], ["migrate"]):
        result = run(tmp_path, *command, DATABASE_URL="sqlite:///./todo.db")
        assert result.returncode == 2
        assert "DATABASE_URL" in result.stderr and "SQLite is not supported" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "todo.db").exists()


def test_production_without_auth_refuses_to_start(tmp_path: Path) -> None:
    result = run(tmp_path, "serve", "--no-migrate", "--port", "1", APP_ENV="production")
    assert result.returncode != 0
    assert "BETTER_AUTH_SECRET" in result.stderr and "BETTER_AUTH_URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("database_url", [None, ""])
@pytest.mark.parametrize("command", [("migrate",), ("serve", "--port", "1"), ("audit", "verify")])
def test_production_without_a_database_url_does_not_start_the_embedded_server(
    tmp_path: Path, command: tuple[str, ...], database_url: str | None
) -> None:
    env = {"APP_ENV": "production", "BETTER_AUTH_SECRET": "s" * 40}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    result = run(tmp_path, *command, **env)
    assert result.returncode == 2, result.stderr
    assert "APP_ENV=production needs DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_production_with_weak_secret_refuses_to_start_without_printing_it(
    tmp_path: Path,
) -> None:
    """Placeholders and lengths are covered in test_settings; here: the exit and no echo."""
    secret = "too-short-" + random_id(8)
    result = run(
        tmp_path,
        "serve",
        "--no-migrate",
        "--port",
        "1",
        APP_ENV="production",
        BETTER_AUTH_SECRET=secret,
    )
    assert result.returncode != 0
    assert "BETTER_AUTH_SECRET" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_tasks_list_reads_a_users_tasks_through_the_api_queries(
    client: TestClient, user: ApiUser, database_url: str, tmp_path: Path
) -> None:
    for title in ("Alpha", "Beta", "Gamma"):
        assert (
            client.post(user.url(), json={"title": title}, headers=user.headers).status_code == 201
        )
    done = client.get(user.url(), headers=user.headers).json()[0]
    client.patch(user.url(f"/{done['id']}/complete"), headers=user.headers)

    result = run(
        tmp_path, "tasks", "list", user.user_id, "--status", "pending", DATABASE_URL=database_url
    )
    assert result.returncode == 0, result.stderr
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [task["title"] for task in listed] == ["Beta", "Alpha"]  # newest first, Gamma done
    assert listed[0] == client.get(user.url(f"/{listed[0]['id']}"), headers=user.headers).json()
    assert "2 of 2 tasks" in result.stderr

    other = run(tmp_path, "tasks", "list", "nobody-at-all", DATABASE_URL=database_url)
    assert other.returncode == 0 and other.stdout == ""


@pytest.mark.parametrize(
    ("text", "found"), [("a\x1b[2J", "U+001B"), ("a\x7f", "U+007F"), ("a\x85", "U+0085")]
)
def test_tasks_list_refuses_the_search_text_the_api_refuses(
    client: TestClient, user: ApiUser, database_url: str, tmp_path: Path, text: str, found: str
) -> None:
    """`--q` took what `GET /api/{user_id}/tasks?q=` answers 400 for, and searched for it."""
    assert client.get(user.url(), params={"q": text}, headers=user.headers).status_code == 400
    result = run(tmp_path, "tasks", "list", user.user_id, "--q", text, DATABASE_URL=database_url)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "todo-api tasks list: error: argument --q: the search text must not contain control "
        f"characters other than tab, line feed and carriage return (found {found})"
    )
    # What the API takes, the command takes (a description may hold tabs and line breaks).
    taken = run(
        tmp_path, "tasks", "list", user.user_id, "--q", "a\tb\nc", DATABASE_URL=database_url
    )
    assert taken.returncode == 0, taken.stderr


def test_a_nul_in_the_search_text_is_a_usage_error_not_a_driver_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A NUL cannot come through a real command line (exec's arguments end at one), but `main`
    takes its arguments as a list: it was psycopg2's ValueError and a traceback."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["tasks", "list", "alice", "--q", "a\x00b"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "the search text must not contain control "
        "characters other than tab, line feed and carriage return (found U+0000)\n"
    )


def test_the_search_text_is_bounded_as_the_apis_q(
    client: TestClient, user: ApiUser, capsys: pytest.CaptureFixture[str]
) -> None:
    """`q` is at most SEARCH_MAX characters; `--q` took any length."""
    longest, too_long = "a" * SEARCH_MAX, "a" * (SEARCH_MAX + 1)
    assert client.get(user.url(), params={"q": too_long}, headers=user.headers).status_code == 400
    assert build_parser().parse_args(["tasks", "list", "alice", "--q", longest]).q == longest
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["tasks", "list", "alice", "--q", too_long])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"argument --q: the search text is at most {SEARCH_MAX} characters\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tasks", "list", b"al\xffce"), "argument user_id: a user id is 1 to 128 characters"),
        (("tasks", "list", "alice", "--q", b"caf\xe9"), "the search text must be UTF-8 text"),
        (("audit", "verify", "--user", b"al\xffce"), "argument --user: a user id is 1 to"),
        (("audit", "export", "--format", "csv", "--user", b"\xff"), "a user id is 1 to"),
        (("dev-token", "alice", "--name", b"Al\xefce"), "argument --name: a name is at most"),
        (("dev-token", "alice", "--email", b"\xff@example.com"), "argument --email: an email"),
    ],
    ids=str,
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, database_url: str, args: tuple[str | bytes, ...], message: str
) -> None:
    """A byte that is not UTF-8 (a Latin-1 shell) reaches Python as a lone surrogate, which
    has no UTF-8 for PostgreSQL: it was the driver's UnicodeEncodeError, a traceback, exit 1."""
    result = run(tmp_path, *args, DATABASE_URL=database_url)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--name", "Alice\nAdmin"), ("--name", "a" * 201), ("--email", "a@b\x00.example")],
    ids=["newline", "over-long", "nul"],
)
def test_dev_token_refuses_a_claim_the_users_table_cannot_store(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """The API leaves such a claim out of the user's row: a token made with it would not
    carry what the developer asked for, and nothing would say so."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["dev-token", "alice", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


def run_serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`todo-api serve` with two workers, stopped with its workers if it has not exited within
    20 s (uvicorn restarts a worker that crashes at start-up forever)."""
    process = subprocess.Popen(
        [str(TODO_API), "serve", "--port", "1", "--workers", "2", *args],
        cwd=tmp_path,
        env=clean_environ(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers go with it
    )
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"serve did not exit:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


JWKS = "http://127.0.0.1:9/api/auth/jwks"
OTLP = "http://127.0.0.1:9"


# The SDK would warn (or not) and carry on with its default: a typo sampling 100%, an endpoint
# every export fails to reach.
BAD_OTEL_VALUES = [
    pytest.param({"OTEL_TRACES_SAMPLER": "bogus"}, "OTEL_TRACES_SAMPLER", id="sampler"),
    *(
        pytest.param(
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg},
            "OTEL_TRACES_SAMPLER_ARG",
            id=f"sampler-arg-{arg}",
        )
        for arg in ("10", "-1", "abc")
    ),
    pytest.param(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "not-a-url"}, "OTEL_EXPORTER_OTLP_ENDPOINT", id="url"
    ),
    pytest.param(
        # The exporter reads it as it is: "Host '127.0.0.1:9 ' contains invalid character".
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"{OTLP} "},
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        id="url-trailing-blank",
    ),
    pytest.param(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:notaport/v1/traces"},
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        id="traces-url-port",
    ),
    pytest.param(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP, "OTEL_EXPORTER_OTLP_TIMEOUT": "abc"},
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        id="exporter-timeout",
    ),
    pytest.param(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP, "OTEL_EXPORTER_OTLP_TIMEOUT": "10000"},
        "milliseconds",
        id="exporter-timeout-in-ms",
    ),
    pytest.param({"OTEL_BSP_SCHEDULE_DELAY": "abc"}, "OTEL_BSP_SCHEDULE_DELAY", id="bsp"),
    pytest.param({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY", id="bsp-0"),
    pytest.param(
        {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"},
        "OTEL_BSP_MAX_QUEUE_SIZE",
        id="bsp-batch-over-queue",
    ),
    pytest.param(
        {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "0"},
        "OTEL_METRIC_EXPORT_INTERVAL",
        id="metric-interval",
    ),
    pytest.param(
        {"OTEL_RESOURCE_ATTRIBUTES": "garbage"}, "OTEL_RESOURCE_ATTRIBUTES", id="resource"
    ),
    pytest.param({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED", id="sdk-disabled"),
]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param(
            {
                "APP_ENV": "production",
                "BETTER_AUTH_URL": "http://127.0.0.1:3917",
                "BETTER_AUTH_JWKS_URL": "ftp://x/jwks",
            },
            "BETTER_AUTH_JWKS_URL",
            id="jwks-url-not-http",
        ),
        pytest.param({"BETTER_AUTH_JWKS_URL": JWKS}, "JWT_ISSUER", id="jwks-url-alone"),
        pytest.param(
            {"BETTER_AUTH_JWKS_URL": JWKS, "JWT_ISSUER": "http://127.0.0.1:3000"},
            "JWT_AUDIENCE",
            id="issuer-without-audience",
        ),
        pytest.param(
            {"BETTER_AUTH_URL": "http://127.0.0.1:notaport"},
            "BETTER_AUTH_URL",
            id="auth-url-port",
        ),
        pytest.param({"BETTER_AUTH_SECRET": ""}, "BETTER_AUTH_SECRET", id="empty-secret"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": OTLP},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            id="otlp-grpc",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": OTLP},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc",
            id="otlp-traces-grpc",
        ),
        pytest.param(
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=grpc",
            id="otlp-metrics-grpc",
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER", id="jaeger"),
        pytest.param({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER", id="statsd"),
        # Accepted, and nothing served: /metrics is METRICS_ENABLED's.
        pytest.param(
            {"OTEL_METRICS_EXPORTER": "prometheus"}, "METRICS_ENABLED", id="prometheus-not-enabled"
        ),
        # Accepted, and /metrics served nothing: the SDK that fills it was off.
        pytest.param(
            {"METRICS_ENABLED": "true", "OTEL_SDK_DISABLED": "true"},
            "OTEL_SDK_DISABLED",
            id="metrics-without-sdk",
        ),
        pytest.param({"AUDIT_SIGNING_KEY": "garbage"}, "signing key", id="audit-key"),
        pytest.param(
            {
                "AUDIT_SIGNING_KEY": base64.b64encode(bytes(range(32))).decode(),
                "AUDIT_CHECKPOINT_INTERVAL_SECONDS": "60",
                "AUDIT_CHECKPOINT_DIR": "/nonexistent/checkpoints",
            },
            "AUDIT_CHECKPOINT_DIR",
            id="checkpoint-dir-missing",
        ),
        pytest.param({"REDIS_URL": "redis://127.0.0.1:notaport/15"}, "REDIS_URL", id="redis-port"),
        # Refused by the settings themselves, like DATABASE_URL=sqlite://...
        pytest.param({"JWT_LEEWAY_SECONDS": "600"}, "JWT_LEEWAY_SECONDS", id="settings-bound"),
        pytest.param({"MAX_REQUEST_HEAD_BYTES": "1024"}, "MAX_REQUEST_HEAD_BYTES", id="head-bound"),
        pytest.param({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL", id="settings-check"),
        *BAD_OTEL_VALUES,
    ],
)
def test_a_bad_setting_stops_serve_with_one_line_before_any_worker_starts(
    tmp_path: Path, database_url: str, env: dict[str, str], named: str
) -> None:
    result = run_serve(tmp_path, "--no-migrate", DATABASE_URL=database_url, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("todo-api: configuration error: ") and named in line, line
    assert result.stdout == ""


def test_otel_variables_in_the_env_file_are_read_and_checked(
    tmp_path: Path, database_url: str
) -> None:
    """`.env` is read for OTEL_* as for every other setting: the SDK reads only the process's
    environment, so an endpoint or a sampler written there was ignored, without a word."""
    (tmp_path / ".env").write_text("OTEL_TRACES_SAMPLER=bogus\n", encoding="utf-8")
    result = run_serve(tmp_path, "--no-migrate", DATABASE_URL=database_url)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("todo-api: configuration error: OTEL_TRACES_SAMPLER "), line


def test_unusable_otlp_headers_are_refused_without_their_value(
    tmp_path: Path, database_url: str
) -> None:
    headers = "x-tenant=a, Bearer Sup3rSecretToken"  # the name of the second was forgotten
    result = run_serve(
        tmp_path, "--no-migrate", DATABASE_URL=database_url, OTEL_EXPORTER_OTLP_HEADERS=headers
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "OTEL_EXPORTER_OTLP_HEADERS" in line and "entry 2" in line, line
    assert "Sup3rSecretToken" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("redis://:Sup3rSecretPw@127.0.0.1:notaport/15", "Sup3rSecretPw"),
        # An unencoded "/" ends the host part early: the port urllib reads is the password's.
        ("redis://:Sup3r/SecretPw@127.0.0.1:6379/15", "Sup3r"),
    ],
)
def test_an_unusable_redis_url_is_refused_without_its_password(
    tmp_path: Path, database_url: str, url: str, password: str
) -> None:
    result = run_serve(tmp_path, "--no-migrate", DATABASE_URL=database_url, REDIS_URL=url)
    assert result.returncode == 2, result.stderr
    assert "REDIS_URL" in result.stderr
    assert password not in result.stderr + result.stdout


@pytest.mark.parametrize("command", [["audit", "checkpoint"], ["audit", "public-key"]])
@pytest.mark.parametrize(
    "env",
    [{"AUDIT_SIGNING_KEY": "garbage-not-a-key"}, {"AUDIT_SIGNING_KEY_FILE": "/nonexistent.pem"}],
    ids=["key", "file"],
)
def test_an_unusable_audit_signing_key_is_a_configuration_error(
    tmp_path: Path, database_url: str, command: list[str], env: dict[str, str]
) -> None:
    result = run(tmp_path, *command, DATABASE_URL=database_url, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("todo-api: configuration error: the audit signing key is unusable")
    assert "garbage-not-a-key" not in line and result.stdout == ""


def test_an_empty_signing_key_variable_counts_as_unset(tmp_path: Path, database_url: str) -> None:
    """As compose and `.env` files write a variable left blank. `AUDIT_SIGNING_KEY_FILE=` was
    the path ".", "cannot read .: Is a directory"; one empty beside the other, "not both"."""
    key = SigningKey.generate()
    key_file = tmp_path / "audit-signing.pem"
    key_file.write_text(key.private_pem())
    for env in (
        {"AUDIT_SIGNING_KEY": key.private_pem(), "AUDIT_SIGNING_KEY_FILE": ""},
        {"AUDIT_SIGNING_KEY": "", "AUDIT_SIGNING_KEY_FILE": str(key_file)},
    ):
        result = run(tmp_path, "audit", "public-key", **env)
        assert (result.returncode, result.stdout) == (0, key.public.pem()), result.stderr
    for env in (
        {"AUDIT_SIGNING_KEY_FILE": ""},
        {"AUDIT_SIGNING_KEY": "", "AUDIT_SIGNING_KEY_FILE": ""},
    ):
        result = run(tmp_path, "audit", "checkpoint", DATABASE_URL=database_url, **env)
        assert result.returncode == 2
        assert result.stderr == (
            "todo-api: checkpoints are signed: set AUDIT_SIGNING_KEY or AUDIT_SIGNING_KEY_FILE\n"
        )


def test_an_unparsable_database_url_is_refused_without_its_password(tmp_path: Path) -> None:
    url = "postgresql://todo:Sup3rDbPw@127.0.0.1:notaport/todo"
    served = run_serve(tmp_path, "--no-migrate", DATABASE_URL=url)
    for result in (served, run(tmp_path, "migrate", DATABASE_URL=url)):
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("todo-api: configuration error: DATABASE_URL is not a valid URL")
        assert "Sup3rDbPw" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args", [("migrate",), ("tasks", "list", "alice"), ("serve", "--port", "0")], ids=str
)
def test_an_unreachable_database_is_one_line_and_exit_3(tmp_path: Path, args: tuple[str]) -> None:
    """As the audit commands say it: no traceback (`serve` migrates first)."""
    url = f"postgresql://todo:Sup3rDbPw@127.0.0.1:{free_port()}/todo"
    argv = ["serve", "--port", str(free_port())] if args[0] == "serve" else list(args)
    result = run(tmp_path, *argv, DATABASE_URL=url, BETTER_AUTH_SECRET=TEST_SECRET)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
    assert line.startswith("todo-api: the database is unreachable: ")
    assert "Sup3rDbPw" not in result.stderr + result.stdout


def test_a_database_never_migrated_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """It was a traceback and exit 1, which `audit verify` means as "tampering found"."""
    key = SigningKey.generate()
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(sign_leaves(key, [], datetime.now(UTC), None).to_json())
    commands = [
        ("audit", "verify"),
        ("audit", "verify", "--checkpoint", str(checkpoint)),
        ("audit", "export", "--format", "csv"),
        ("audit", "checkpoint"),
        ("tasks", "list", "alice"),
    ]
    with scratch_database(migrated=False) as url:
        for args in commands:
            result = run(tmp_path, *args, DATABASE_URL=url, AUDIT_SIGNING_KEY=key.private_pem())
            assert result.returncode == 3, (args, result.stderr)
            [line] = result.stderr.splitlines()
            assert line.startswith("todo-api: the database is not migrated (relation "), line
            assert line.endswith("does not exist): run `todo-api migrate`"), line


def test_an_input_file_that_cannot_be_read_is_a_usage_error(
    tmp_path: Path, database_url: str
) -> None:
    """A missing `--against` file exited 1 ("tampering found"), a missing `--checkpoint` file
    was a failed checkpoint (JSON, exit 1), a missing `--public-key` exit 2: now all exit 2."""
    key = SigningKey.generate()
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(sign_leaves(key, [], datetime.now(UTC), None).to_json())
    missing, directory = tmp_path / "missing.json", tmp_path / "a-directory"
    directory.mkdir()
    cases = [
        (("--against", str(missing)), f"cannot read {missing}: No such file or directory"),
        (("--against", str(directory)), f"cannot read {directory}: Is a directory"),
        (("--checkpoint", str(missing)), f"cannot read {missing}: No such file or directory"),
        (("--checkpoint", str(checkpoint), str(directory)), f"cannot read {directory}: Is a"),
        (
            ("--checkpoint", str(checkpoint), "--public-key", str(missing)),
            f"cannot read {missing}: No such file or directory",
        ),
    ]
    for args, message in cases:
        result = run(
            tmp_path,
            "audit",
            "verify",
            *args,
            DATABASE_URL=database_url,
            AUDIT_SIGNING_KEY=key.private_pem(),
        )
        assert (result.returncode, result.stdout) == (2, ""), (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"todo-api: {message}"), (args, line)


@pytest.mark.parametrize(
    "args",
    [
        ("audit", "verify"),
        ("audit", "export", "--format", "csv", "--user", "nobody-at-all"),
        ("dev-token", "alice"),
    ],
    ids=str,
)
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_stops_reading_ends_the_command_quietly(
    tmp_path: Path, database_url: str, args: tuple[str, ...], buffered: bool
) -> None:
    """`todo-api audit verify | head -1` printed a BrokenPipeError traceback and exited 1,
    which `audit verify` means as "tampering found". Now: nothing said (not even "Exported"),
    and 141, as if killed by SIGPIPE."""
    env = clean_environ(
        OTEL_SDK_DISABLED="true", DATABASE_URL=database_url, BETTER_AUTH_SECRET=TEST_SECRET
    )
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes its first line
    try:
        result = subprocess.run(
            [str(TODO_API), *args],
            cwd=tmp_path,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")


def test_migrations_are_not_bound_by_the_requests_statement_timeout(tmp_path: Path) -> None:
    """An index build on a large table outlasts a request's timeout; here every statement does."""
    with scratch_database(migrated=False) as url:
        result = run(tmp_path, "migrate", DATABASE_URL=url, DB_STATEMENT_TIMEOUT_MS="1")
        assert result.returncode == 0, result.stderr


def test_a_cancelled_statement_is_not_called_unreachable(
    tmp_path: Path, database_url: str, user: ApiUser
) -> None:
    """The server answered: the line says what it said, and which setting to look at."""
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:  # the command's query waits for this lock, then times out
            conn.execute(sa.text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            result = run(
                tmp_path,
                "tasks",
                "list",
                user.user_id,
                DATABASE_URL=database_url,
                DB_STATEMENT_TIMEOUT_MS="200",
            )
    finally:
        engine.dispose()
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
    assert line == (
        "todo-api: the database cancelled a statement: canceling statement due to statement "
        "timeout (DB_STATEMENT_TIMEOUT_MS, or the statement_timeout set on the role or database)"
    )


# A database error is said in its first line: PostgreSQL's DETAIL, HINT and CONTEXT lines quote
# values (`Key (user_id, lower(name))=(bob, groceries) already exists`), its LINE the statement,
# and libpq adds hints of its own; spans and logs say the first line only, and so does the CLI.


def test_a_constraint_violation_is_said_without_its_detail(tmp_path: Path) -> None:
    """The checkpoints' id sequence behind the table, as a data-only restore leaves it: the
    insert's DETAIL (`Key (id)=(1) already exists.`) was printed after the line."""
    key = SigningKey.generate()
    with scratch_database() as url:
        env = {"DATABASE_URL": url, "AUDIT_SIGNING_KEY": key.private_pem()}
        assert run(tmp_path, "audit", "checkpoint", **env).returncode == 0
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "SELECT setval(pg_get_serial_sequence('audit_checkpoints', 'id'), 1, false)"
                    )
                )
        finally:
            engine.dispose()
        result = run(tmp_path, "audit", "checkpoint", **env)
    assert (result.returncode, result.stdout) == (3, ""), result.stderr
    assert result.stderr.splitlines() == [
        "todo-api: the database failed the command (23505): duplicate key value violates "
        'unique constraint "audit_checkpoints_pkey"'
    ]


def test_a_permission_error_is_said_without_the_statement(tmp_path: Path) -> None:
    """`migrate` as a role that may not create in the schema (PostgreSQL 15 grants no one
    CREATE on `public`): the error's `LINE 2: CREATE TABLE ...` and its caret were printed."""
    role = f"todo_migrator_{secrets.token_hex(4)}"
    with scratch_database(migrated=False) as url:
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
                conn.execute(sa.text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            limited = sa.make_url(url).set(username=role).render_as_string(hide_password=False)
            result = run(tmp_path, "migrate", DATABASE_URL=limited)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP ROLE "{role}"'))
            admin.dispose()
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        "todo-api: the database failed the command (42501): permission denied for schema public"
    ]


def test_an_unreachable_database_is_said_without_libpqs_hint(tmp_path: Path) -> None:
    """libpq's second line (`Is the server running on that host ...?`) was printed too."""
    url = f"postgresql://todo@127.0.0.1:{free_port()}/todo"
    result = run(tmp_path, "tasks", "list", "alice", DATABASE_URL=url)
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("todo-api: the database is unreachable: connection to server at ")
    assert line.endswith("failed: Connection refused"), line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("serve", "--port", "99999"), "99999 is not between 1 and 65535"),
        (("serve", "--workers", "0"), "0 is not between 1 and 256"),
        (("dev-token", "alice", "--ttl", "0"), "0 is not between 1 and"),
        (("dev-token", ""), "a user id is 1 to"),
        (("dev-token", "dave\x85"), "a user id is 1 to"),
        (("dev-token", "a\x1b[2J"), "a user id is 1 to"),
        (("tasks", "list", "alice", "--limit", "0"), "0 is not between 1 and 500"),
        (("tasks", "list", "alice", "--limit", "ten"), "'ten' is not a whole number"),
    ],
    ids=str,
)
def test_arguments_out_of_range_are_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """They were taken as given: a port modulo 65536, one worker for 0, a token expired at
    birth or for the user '', and a 2.6 KB list of the numbers 1 to 500."""
    result = run(tmp_path, *args, BETTER_AUTH_SECRET=TEST_SECRET)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr) < 600


POOLER_FIX = (
    "behind a transaction pooler (Neon's -pooler host, PgBouncer) set DB_STATEMENT_TIMEOUT_MS=0 "
    "and DB_IDLE_IN_TRANSACTION_TIMEOUT_MS=0, take `options` out of DATABASE_URL if it has "
    "them, and set the timeouts on the role instead (ALTER ROLE ... SET statement_timeout = "
    "'10s', and idle_in_transaction_session_timeout)"
)


def test_a_server_that_refuses_the_requests_connection_options_stops_serve_with_the_fix(
    tmp_path: Path, database_url: str
) -> None:
    """Behind PgBouncer (Neon's -pooler host), the startup option that sets
    DB_STATEMENT_TIMEOUT_MS is refused. Migrations did not send it, so `serve` started, and then
    every request was a 503 with no word of why. Now `serve` (also with `--no-migrate`) connects
    once as the requests do and exits 3 with the server's line and the fix; the other commands
    say the same; with both timeouts 0 all of them work. `migrate` sends no timeout: it works
    either way."""
    target = sa.make_url(database_url)
    with StartupParameterRefusingProxy(server_address(target)) as pooler:
        url = proxied_url(target, pooler.port)
        env = {"DATABASE_URL": url, "BETTER_AUTH_SECRET": TEST_SECRET}
        assert run(tmp_path, "migrate", **env).returncode == 0
        assert pooler.refusals == 0
        refused = [
            run_serve(tmp_path, "--no-migrate", **env),
            run_serve(tmp_path, **env),
            run(tmp_path, "tasks", "list", "alice", **env),
        ]
        assert pooler.refusals >= len(refused)
        for result in refused:
            assert result.returncode == 3, result.stderr
            assert "Traceback" not in result.stderr
            [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
            assert line.startswith("todo-api: the database refused the connection: "), line
            assert "FATAL:  unsupported startup parameter: options; " in line
            assert line.endswith(POOLER_FIX), line
        env["DB_STATEMENT_TIMEOUT_MS"] = "0"
        env["DB_IDLE_IN_TRANSACTION_TIMEOUT_MS"] = "0"
        # The URL's own `options` are sent too (they are kept beside the timeouts'): the fix
        # names them, where it named the timeouts alone, which were already 0.
        with_options = sa.make_url(url).update_query_dict({"options": "-c search_path=public"})
        result = run(
            tmp_path,
            "tasks",
            "list",
            "alice",
            **{**env, "DATABASE_URL": with_options.render_as_string(hide_password=False)},
        )
        assert result.returncode == 3, result.stderr
        [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
        assert line.endswith(POOLER_FIX), line
        before = pooler.refusals
        assert run(tmp_path, "tasks", "list", "alice", **env).returncode == 0
        server = ServeProcess(tmp_path, env).start()
        try:
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        finally:
            server.stop()
        assert pooler.refusals == before


def test_serve_without_migrating_starts_while_the_database_is_unreachable(
    tmp_path: Path,
) -> None:
    """Only a refusal stops it: a database not answering yet is a warning, /readyz a 503."""
    url = f"postgresql://todo@127.0.0.1:{free_port()}/todo"
    server = ServeProcess(tmp_path, {"DATABASE_URL": url, "BETTER_AUTH_SECRET": TEST_SECRET})
    server.launch()
    try:
        wait_until(lambda: _readyz_status(server.url) == 503, "a 503 from /readyz")
    finally:
        server.stop()
    assert "the database cannot be used yet; serving anyway" in server.log.read_text()


def test_dev_token_without_a_secret_says_so_in_one_line(tmp_path: Path, database_url: str) -> None:
    """Production with Better Auth's keys alone: no secret to sign with, and no file made."""
    result = run(
        tmp_path,
        *("dev-token", "alice"),
        APP_ENV="production",
        DATABASE_URL=database_url,
        BETTER_AUTH_URL="https://app.example.com",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == "todo-api: dev-token signs HS256 tokens: set BETTER_AUTH_SECRET\n"
    assert result.stdout == ""


def test_serve_on_a_port_already_taken_exits_2_in_one_line(
    tmp_path: Path, database_url: str
) -> None:
    """Not uvicorn's exit 3 (here: the database) with only a JSON log line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run(
            tmp_path,
            *("serve", "--no-migrate", "--port", port),
            DATABASE_URL=database_url,
            BETTER_AUTH_SECRET=TEST_SECRET,
        )
    assert result.returncode == 2, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
    assert line == f"todo-api: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_metrics_port_on_a_port_it_cannot_take_exits_2_in_one_line(
    tmp_path: Path, database_url: str, workers: str
) -> None:
    """METRICS_PORT taken by another process was a WARNING and no metrics served; the API's
    own port was uvicorn's exit 3 (here: the database) with only a log line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        api = str(free_port())
        for metrics_port, port in ((busy, api), (api, api)):
            result = run_serve(
                tmp_path,
                *("--no-migrate", "--port", port, "--workers", workers),
                DATABASE_URL=database_url,
                BETTER_AUTH_SECRET=TEST_SECRET,
                METRICS_ENABLED="true",
                METRICS_PORT=metrics_port,
            )
            assert result.returncode == 2, result.stderr
            [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
            assert line == (
                f"todo-api: cannot listen on 127.0.0.1:{metrics_port} (METRICS_HOST, "
                "METRICS_PORT): Address already in use"
            )


def test_the_schema_check_reads_the_revisions_alembic_reads() -> None:
    """`service.schema` reads the migrations' revision ids without Alembic (a worker would
    load 12 MB for its probe): what it finds must be Alembic's own graph."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    heads = frozenset(script.get_heads())
    every = frozenset(revision.revision for revision in script.walk_revisions())
    assert revisions() == (heads, every - heads)


def test_a_role_that_may_not_read_the_schema_revision_is_ready_and_told_once(
    settings: Settings, database_url: str, make_user: MakeUser, caplog: pytest.LogCaptureFixture
) -> None:
    """A least-privilege role, granted the service's tables but not alembic_version: its
    requests work, so /readyz does not fail on the check it cannot make; one WARNING says so."""
    grants = [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
        "REVOKE ALL ON alembic_version FROM {role}",
    ]
    user = make_user()
    with limited_role(settings, database_url, grants) as limited:
        _unchecked.cache_clear()
        app = create_app(settings, limited)
        with TestClient(app) as client, caplog.at_level("WARNING", "service.schema"):
            assert [client.get("/readyz").status_code for _ in range(2)] == [200, 200]
            created = client.post(user.url(), headers=user.headers, json={"title": "t"})
            assert created.status_code == 201, created.text
    [warning] = [r.getMessage() for r in caplog.records if r.name == "service.schema"]
    assert warning.startswith(
        "the schema revision cannot be read (permission denied for table alembic_version)"
    )


def test_a_role_granted_nothing_is_not_ready(
    settings: Settings, database_url: str, make_user: MakeUser, caplog: pytest.LogCaptureFixture
) -> None:
    """A role created and never granted the tables was ready (the revision check skipped), and
    answered 500 to every request: it is kept out of the rotation, and `serve` says why."""
    user = make_user()
    with limited_role(settings, database_url, []) as limited:
        app = create_app(settings, limited)
        with TestClient(app) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["detail"] == (
                "The database role may not read the tasks table: grant it the service's tables "
                "(every request would fail)."
            )
            assert ready.headers["Retry-After"]
            assert client.get(user.url(), headers=user.headers).status_code == 500
        url = limited.engine.url.render_as_string(hide_password=False)
        with caplog.at_level("WARNING", "service.cli"):
            check_requests_connect(settings.model_copy(update={"database_url": url}))
    assert any(
        "may not read the tasks table" in r.getMessage() and "Serving anyway" in r.getMessage()
        for r in caplog.records
    ), caplog.text


@contextmanager
def limited_role(settings: Settings, database_url: str, grants: list[str]) -> Iterator[Database]:
    """The run's database, as a new LOGIN role given `grants` (`{role}` in each)."""
    role = f"todo_limited_{secrets.token_hex(4)}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        for grant in grants:
            conn.execute(sa.text(grant.format(role=f'"{role}"')))
    url = sa.make_url(database_url).set(username=role).render_as_string(hide_password=False)
    limited = Database(build_engine(settings, url))
    try:
        yield limited
    finally:
        limited.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))
        admin.dispose()


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_stopped_by_sigterm_exits_0(tmp_path: Path, database_url: str, workers: int) -> None:
    """SIGTERM is how a container is stopped: after the graceful shutdown, a success (it was
    143 with one worker, uvicorn raising the signal again, and 0 with several)."""
    env = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": TEST_SECRET}
    server = ServeProcess(tmp_path, env, workers=workers).start()
    assert server.stop() == 0, server.log.read_text()[-2000:]
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("wrong", ["database", "username"])
def test_serve_stops_when_the_database_refuses_for_good(
    tmp_path: Path, database_url: str, wrong: str
) -> None:
    """A database or role that does not exist (a typo in DATABASE_URL) is no server still
    starting: `serve --no-migrate` exits 3 with the server's line, instead of an instance
    that stays up and never becomes ready."""
    missing = f"todo_missing_{secrets.token_hex(4)}"
    url = sa.make_url(database_url).set(**{wrong: missing})
    env = {"DATABASE_URL": url.render_as_string(hide_password=False)}
    result = run_serve(tmp_path, "--no-migrate", BETTER_AUTH_SECRET=TEST_SECRET, **env)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("todo-api:")]
    assert line.startswith("todo-api: the database refused the connection: "), line
    assert line.endswith(
        f'FATAL:  {"role" if wrong == "username" else wrong} "{missing}" does not exist'
    )


def test_serve_on_a_database_not_migrated_or_behind_is_not_ready_until_migrated(
    tmp_path: Path,
) -> None:
    """`serve --no-migrate` (the image's default) on a database nobody migrated, or that a
    skipped `todo-api migrate` left a release behind: its requests would be 500s, so /readyz
    is 503 and says why, and turns 200 once the database is migrated, with no restart. A
    revision the release does not know is a later release's: ready."""
    from alembic.script import ScriptDirectory

    from alembic import command

    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    head = _head()
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    with scratch_database(migrated=False) as url:
        server = ServeProcess(tmp_path, {"DATABASE_URL": url, "BETTER_AUTH_SECRET": TEST_SECRET})
        server.launch()
        try:
            wait_until(lambda: _readyz_status(server.url) is not None, "an answer from /readyz")
            not_migrated = httpx.get(f"{server.url}/readyz", timeout=10)
            assert not_migrated.status_code == 503
            assert not_migrated.json()["detail"] == (
                "The database is not migrated: run `todo-api migrate`."
            )
            assert not_migrated.headers["Retry-After"]

            command.upgrade(alembic_config(url), previous)
            behind = httpx.get(f"{server.url}/readyz", timeout=10)
            assert behind.status_code == 503
            assert behind.json()["detail"] == (
                f"The database schema is at revision {previous}, older than this release's "
                f"{head}: run `todo-api migrate`."
            )

            command.upgrade(alembic_config(url), "head")
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200

            engine = sa.create_engine(url, poolclass=sa.NullPool)
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE alembic_version SET version_num = 'a_later_one'"))
            engine.dispose()
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        finally:
            server.stop()
    assert (
        "The database is not migrated: run `todo-api migrate`. Serving anyway; /readyz is 503 "
        "until it is." in server.log.read_text()
    )


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("57P03", "the database system is starting up"),
        ("53300", "sorry, too many clients already"),
    ],
)
def test_serve_without_migrating_starts_while_the_database_refuses_for_now(
    tmp_path: Path, database_url: str, sqlstate: str, message: str
) -> None:
    """A database restarting, or out of connections during a rolling deploy, refuses with a
    FATAL too: that is no setting to change, and stopping would crash-loop the new instances."""
    target = sa.make_url(database_url)
    with StartupParameterRefusingProxy(server_address(target), every=(sqlstate, message)) as db:
        env = {"DATABASE_URL": proxied_url(target, db.port), "BETTER_AUTH_SECRET": TEST_SECRET}
        server = ServeProcess(tmp_path, env)
        server.launch()
        try:
            wait_until(lambda: _readyz_status(server.url) == 503, "a 503 from /readyz")
        finally:
            server.stop()
    assert db.refusals >= 1
    log = server.log.read_text()
    assert "serving anyway" in log
    assert message in log


def _readyz_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code
    except httpx.TransportError:
        return None


def test_migrations_are_not_bound_by_a_role_or_database_statement_timeout(
    tmp_path: Path,
) -> None:
    """Behind a transaction pooler the requests' timeout is set on the role or the database
    (README, Running against Neon), where the migrations' connections get it too. Here the
    database's is 200 ms and the last migration's ALTER TABLE waits for a lock held
    elsewhere: it was cancelled at 200 ms (exit 3); it now waits on, past 1 s, and finishes
    once the lock is released."""
    with scratch_database(migrated=False) as url:
        from alembic import command

        command.upgrade(alembic_config(url), "0017")
        name = sa.make_url(url).database
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET statement_timeout = '200ms'"))
            holder = admin.connect()
            holder.execute(sa.text("BEGIN"))
            holder.execute(sa.text("LOCK TABLE audit_verified_heads IN ACCESS SHARE MODE"))
            process = subprocess.Popen(
                [str(TODO_API), "migrate"],
                cwd=tmp_path,
                env=clean_environ(OTEL_SDK_DISABLED="true", DATABASE_URL=url),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_until(
                    lambda: process.poll() is not None or _lock_wait_over_a_second(admin),
                    "the migration to wait for the lock past 1 s, or to end",
                )
                assert process.poll() is None, process.communicate()[1]
            finally:
                holder.execute(sa.text("ROLLBACK"))
                holder.close()
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr
            with admin.connect() as conn:
                assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                    (_head(),)
                ]
                assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "200ms"
        finally:
            admin.dispose()


def _head() -> str:
    """The newest migration's revision: what `migrate` leaves in alembic_version."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    assert head is not None
    return head


def test_migrations_from_scratch_run_under_a_1ms_database_statement_timeout(
    tmp_path: Path,
) -> None:
    """Every statement, SQLAlchemy's own when it connects (the server's version, hstore's
    type) included: they were cancelled before the migration's transaction began."""
    with scratch_database(migrated=False) as url:
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        try:
            # One session, opened before the setting: it keeps no timeout for the checks.
            with admin.connect() as conn:
                name = sa.make_url(url).database
                conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET statement_timeout = '1ms'"))
                result = run(tmp_path, "migrate", DATABASE_URL=url, DB_STATEMENT_TIMEOUT_MS="0")
                assert result.returncode == 0, result.stderr
                versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
                assert versions == [(_head(),)]
        finally:
            admin.dispose()


def _lock_wait_over_a_second(admin: sa.Engine) -> bool:
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND clock_timestamp() - query_start > interval '1 second'"
    )
    with admin.connect() as conn:
        return bool(conn.execute(sa.text(query)).scalar_one())
