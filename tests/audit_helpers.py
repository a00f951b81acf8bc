"""Helpers shared by the audit tests (no tests here).

`scratch_database` makes a database of its own for tests that break chains on purpose (the
shared test database must keep verifying) or that need to see every chain in a database.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.cli import alembic_config, build_parser, run
from service.settings import Settings

# The audit_events triggers and how 0002 enables them; restored exactly after tampering.
AUDIT_TRIGGERS = ("audit_events_append_only", "audit_events_no_truncate", "audit_events_notify")
CHAIN_HEAD_TRIGGERS = ("audit_chain_heads_no_delete", "audit_chain_heads_no_truncate")


def change(client: TestClient, method: str, path: str, user: Any, **kwargs: Any) -> Any:
    """A task write through the API that must succeed."""
    response = client.request(method, user.url(path), headers=user.headers, **kwargs)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def events_of(engine: sa.Engine, user_id: str) -> list[dict[str, Any]]:
    """The user's stored events in seq order, straight from the table."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM audit_events WHERE user_id = :u ORDER BY seq"), {"u": user_id}
        )
        return [dict(row._mapping) for row in rows]


def assert_nothing_written(engine: sa.Engine, user_id: str) -> None:
    """No task of the user's, and no audit event: a request refused before the app wrote."""
    with engine.connect() as conn:
        tasks = conn.execute(
            sa.text("SELECT count(*) FROM tasks WHERE user_id = :u"), {"u": user_id}
        ).scalar_one()
    assert tasks == 0
    assert events_of(engine, user_id) == []


def chain_head(engine: sa.Engine, user_id: str) -> tuple[int, str] | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT seq, hash FROM audit_chain_heads WHERE user_id = :u"), {"u": user_id}
        ).first()
    return (int(row.seq), str(row.hash)) if row is not None else None


@contextmanager
def tampering(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A superuser transaction in which audit_events and the chain heads accept any change.

    Disabling and re-enabling happen in the same transaction, so no other session ever sees
    the table unguarded, and a failure rolls the triggers back to ENABLE ALWAYS with the rest.
    """
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        conn.execute(sa.text("ALTER TABLE audit_chain_heads DISABLE TRIGGER USER"))
        yield conn
        for name in AUDIT_TRIGGERS:
            conn.execute(sa.text(f"ALTER TABLE audit_events ENABLE ALWAYS TRIGGER {name}"))
        for name in CHAIN_HEAD_TRIGGERS:
            conn.execute(sa.text(f"ALTER TABLE audit_chain_heads ENABLE ALWAYS TRIGGER {name}"))


def tamper(engine: sa.Engine, user_id: str, *statements: str) -> None:
    """Run each statement (`:u` is the user's id) by a hand that disabled the guards."""
    with tampering(engine) as conn:
        for statement in statements:
            conn.execute(sa.text(statement), {"u": user_id})


def _server_url() -> sa.URL:
    return sa.make_url(
        os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    ).set(drivername="postgresql+psycopg2")


@contextmanager
def scratch_database(*, migrated: bool = True) -> Iterator[str]:
    """A new database, migrated to head with Alembic unless told not to; dropped afterwards."""
    from alembic import command

    name = f"todo_audit_{os.getpid()}_{secrets.token_hex(4)}"
    admin = sa.create_engine(_server_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = _server_url().set(database=name).render_as_string(hide_password=False)
        if migrated:
            command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_cli(settings: Settings, *argv: str) -> tuple[int, str, str]:
    """`todo-api <argv>` in-process against `settings`: (exit status, stdout, stderr), with the
    failures `main` reports in one line reported the same way."""
    args: argparse.Namespace = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = run(args, settings)
    return status, out.getvalue(), err.getvalue()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
