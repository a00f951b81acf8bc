"""Test fixtures: one migrated PostgreSQL database per run; each test isolated by its own users.

The server is TEST_DATABASE_URL's (CI sets it to the system server), or, when it is unset, the
embedded server of this checkout, started for the run and stopped after it.

Every row in this product belongs to a user and every query filters by owner, so a test that
works only with fresh user ids cannot see or disturb another test's rows; the audit log is
append-only (TRUNCATE is refused by design), so tests do not clean up by deleting.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_dev_token
from service.cli import alembic_config
from service.database import Database, build_engine
from service.embedded import EmbeddedPostgres
from service.settings import AppEnv, Settings
from tests.jwt_helpers import random_id
from tests.support import TEST_SECRET, ApiUser, EmbeddedRedis, LiveServer, clean_env, redis_url

__all__ = ["clean_env"]  # the shared fixture, defined with the helpers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def postgres_server() -> Iterator[sa.URL]:
    """The server of the run. The embedded one's URL goes into TEST_DATABASE_URL, where the
    helpers and the subprocesses of the tests look for the server, as with CI's."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield sa.make_url(configured)
        return
    embedded = EmbeddedPostgres(REPO / ".todo-api-pg")
    os.environ["TEST_DATABASE_URL"] = embedded.acquire()
    try:
        yield sa.make_url(os.environ["TEST_DATABASE_URL"])
    finally:
        del os.environ["TEST_DATABASE_URL"]
        embedded.release()


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[str]:
    """The run's Redis: TEST_REDIS_URL's (CI's), else a private one (`EmbeddedRedis`), whose
    URL goes into TEST_REDIS_URL for the helpers and the subprocesses of the tests."""
    configured = os.environ.get("TEST_REDIS_URL")
    if configured:
        yield configured
        return
    embedded = EmbeddedRedis()
    os.environ["TEST_REDIS_URL"] = embedded.url
    try:
        yield embedded.url
    finally:
        del os.environ["TEST_REDIS_URL"]
        embedded.stop()


@pytest.fixture(scope="session")
def database_url(postgres_server: sa.URL) -> Iterator[str]:
    """A new database on the test server, migrated to head with Alembic, dropped at the end."""
    from alembic import command

    server = postgres_server
    if server.get_backend_name() not in {"postgresql", "postgres"}:
        pytest.exit("TEST_DATABASE_URL must point at PostgreSQL", returncode=3)
    name = f"todo_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(
        server.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.exit(
            f"PostgreSQL at {server.render_as_string(hide_password=True)} is unreachable: "
            f"{exc.orig}. The suite needs it: start it, or unset TEST_DATABASE_URL to run on "
            "the embedded server.",
            returncode=3,
        )
    url = server.set(database=name).render_as_string(hide_password=False)
    config = alembic_config(url)
    command.upgrade(config, "head")
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def base_settings(database_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        app_env=AppEnv.test,
        database_url=database_url,
        better_auth_secret=TEST_SECRET,
        db_pool_size=10,
        db_max_overflow=20,
        # Counted, but out of reach: tests of the limits themselves set their own.
        rate_limit_read="100000/minute",
        rate_limit_write="100000/minute",
        rate_limit_expensive="100000/minute",
        rate_limit_anonymous="100000/minute",
        # The reminder workers fire any user's due reminders: only their own tests run them.
        reminders_enabled=False,
    )


@pytest.fixture(scope="session")
def database(base_settings: Settings) -> Iterator[Database]:
    db = Database(build_engine(base_settings))
    yield db
    db.dispose()


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    return base_settings


@pytest.fixture
def app(settings: Settings, database: Database) -> FastAPI:
    return create_app(settings, database)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """The ASGI app in-process; server errors come back as responses, as a real client sees."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def make_user(settings: Settings) -> Iterator[object]:
    """Make users with fresh Better-Auth-shaped ids and HS256 tokens signed with the secret."""

    def make(email: str | None = None, name: str | None = None) -> ApiUser:
        user_id = random_id()
        assert settings.better_auth_secret is not None
        token = create_dev_token(
            settings.better_auth_secret.get_secret_value(),
            user_id,
            email=email or f"{user_id.lower()}@example.com",
            name=name or "Test User",
        )
        return ApiUser(user_id, token)

    yield make


@pytest.fixture
def user(make_user) -> ApiUser:  # type: ignore[no-untyped-def]
    return make_user()


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    prefix = f"todo-api-test-{secrets.token_hex(6)}"
    yield prefix
    client = redis.Redis.from_url(redis_url())
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()
