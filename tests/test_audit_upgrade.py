"""An audit chain across the upgrade that added priorities, due dates, tags and recurrence.

Events written before it (hash_version 1, task states with the first seven fields, written
here as the previous release wrote them) and after it (hash_version 2, states with every
field, `caused_by_seq`) form one chain, which `audit verify` (API and CLI) accepts; altering
an old event is still detected. The database is migrated from the revision before to head,
with tasks in it, and the migration fills them with the defaults.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.chain import GENESIS_HASH, HASH_VERSION, HASHED_FIELDS, compute_hash, format_timestamp
from audit.recorder import diff
from service.app import create_app
from service.auth import create_dev_token
from service.cli import alembic_config
from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import events_of, run_cli, tampering
from tests.jwt_helpers import random_id
from tests.support import ApiUser

BEFORE_UPGRADE = "0009"  # the revision before 0010_organize_tasks
V1_TASK_FIELDS = ("title", "description", "completed")


def _server() -> sa.URL:
    return sa.make_url(
        os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    ).set(drivername="postgresql+psycopg2")


@pytest.fixture(scope="module")
def old_database(database_url: str) -> Iterator[str]:
    """A database migrated only up to the revision before this feature (on the run's server:
    `database_url` starts it and sets TEST_DATABASE_URL)."""
    from alembic import command

    name = f"todo_upgrade_{os.getpid()}_{secrets.token_hex(4)}"
    admin = sa.create_engine(_server(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = _server().set(database=name).render_as_string(hide_password=False)
        command.upgrade(alembic_config(url), BEFORE_UPGRADE)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _old_state(task: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": task["id"],
        "user_id": task["user_id"],
        "title": task["title"],
        "description": task["description"],
        "completed": task["completed"],
        "created_at": format_timestamp(task["created_at"]),
        "updated_at": format_timestamp(task["updated_at"]),
    }


def _old_release_write(
    conn: sa.Connection,
    user_id: str,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """What the previous release's recorder did: a hash_version 1 event, in the transaction
    of the task change."""
    head = conn.execute(
        sa.text(
            "INSERT INTO audit_chain_heads (user_id, seq, hash) VALUES (:u, 1, :g) "
            "ON CONFLICT (user_id) DO UPDATE SET seq = audit_chain_heads.seq + 1 "
            "RETURNING seq, hash, clock_timestamp()"
        ),
        {"u": user_id, "g": GENESIS_HASH},
    ).one()
    task_id = (after or before or {})["id"]
    event: dict[str, Any] = {
        "user_id": user_id,
        "seq": head[0],
        "prev_hash": head[1],
        "occurred_at": head[2],
        "actor_id": user_id,
        "action": action,
        "entity_type": "task",
        "entity_id": str(task_id),
        "before": before,
        "after": after,
        "changes": diff(before, after, V1_TASK_FIELDS),
        "request_id": None,
        "trace_id": None,
        "span_id": None,
        "client_ip": None,
        "user_agent": None,
    }
    event["hash"] = compute_hash(event, 1)
    columns = (*HASHED_FIELDS[1], "hash")
    conn.execute(
        sa.text(
            f"INSERT INTO audit_events ({', '.join(columns)}, hash_version, xact_id) "
            f"VALUES ({', '.join(':' + c for c in columns)}, 1, txid_current())"
        ).bindparams(
            sa.bindparam("before", type_=sa.JSON),
            sa.bindparam("after", type_=sa.JSON),
            sa.bindparam("changes", type_=sa.JSON),
        ),
        event,
    )
    conn.execute(
        sa.text("UPDATE audit_chain_heads SET hash = :h WHERE user_id = :u"),
        {"h": event["hash"], "u": user_id},
    )


def _old_release_tasks(url: str, user_id: str) -> list[int]:
    """Two tasks created and one renamed by the previous release."""
    engine = sa.create_engine(url)
    ids = []
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO users (id) VALUES (:u)"), {"u": user_id})
        for title in ("Old one", "Old two"):
            with engine.begin() as conn:
                now = datetime.now(UTC)
                row = (
                    conn.execute(
                        sa.text(
                            "INSERT INTO tasks (user_id, title, description, completed, "
                            "created_at, updated_at) VALUES (:u, :t, 'from before', false, :n, :n) "
                            "RETURNING id, user_id, title, description, completed, created_at, "
                            "updated_at"
                        ),
                        {"u": user_id, "t": title, "n": now},
                    )
                    .mappings()
                    .one()
                )
                _old_release_write(conn, user_id, "task.created", None, _old_state(dict(row)))
                ids.append(int(row["id"]))
        with engine.begin() as conn:
            before = (
                conn.execute(
                    sa.text(
                        "SELECT id, user_id, title, description, completed, created_at, updated_at "
                        "FROM tasks WHERE id = :i FOR UPDATE"
                    ),
                    {"i": ids[0]},
                )
                .mappings()
                .one()
            )
            after = (
                conn.execute(
                    sa.text(
                        "UPDATE tasks SET title = 'Old one, renamed', "
                        "updated_at = clock_timestamp(), version = version + 1 "
                        "WHERE id = :i RETURNING id, user_id, title, "
                        "description, completed, created_at, updated_at"
                    ),
                    {"i": ids[0]},
                )
                .mappings()
                .one()
            )
            _old_release_write(
                conn, user_id, "task.updated", _old_state(dict(before)), _old_state(dict(after))
            )
    finally:
        engine.dispose()
    return ids


def test_a_chain_across_the_upgrade_verifies(old_database: str, base_settings: Settings) -> None:
    from alembic import command

    user_id = random_id()
    old_ids = _old_release_tasks(old_database, user_id)
    command.upgrade(alembic_config(old_database), "head")

    settings = base_settings.model_copy(update={"database_url": old_database})
    database = Database(build_engine(settings))
    secret = settings.better_auth_secret
    assert secret is not None
    user = ApiUser(user_id, create_dev_token(secret.get_secret_value(), user_id))
    try:
        with TestClient(create_app(settings, database), raise_server_exceptions=False) as client:
            # The migration gave the old tasks the defaults.
            old = client.get(user.url(f"/{old_ids[0]}"), headers=user.headers).json()
            assert old["title"] == "Old one, renamed"
            assert (old["priority"], old["due_at"], old["tags"], old["recurrence"]) == (
                "none",
                None,
                [],
                None,
            )
            # The new release changes an old task, and runs a recurring series.
            client.put(
                user.url(f"/{old_ids[0]}"),
                json={"priority": "high", "tags": ["legacy"]},
                headers=user.headers,
            ).raise_for_status()
            client.delete(user.url(f"/{old_ids[1]}"), headers=user.headers).raise_for_status()
            new = client.post(
                user.url(),
                json={"title": "New", "due_at": "2027-01-01T00:00:00Z", "recurrence": "FREQ=DAILY"},
                headers=user.headers,
            ).json()
            client.patch(
                user.url(f"/{new['id']}/complete"), headers=user.headers
            ).raise_for_status()

            events = events_of(database.engine, user_id)
            # Written by the release of this test: hash_version 2; by the current writer (whose
            # hash PostgreSQL computes, issue #10) HASH_VERSION. Both field lists are the same.
            assert [e["hash_version"] for e in events] == [1, 1, 1, *[HASH_VERSION] * 5]
            assert [e["action"] for e in events] == [
                "task.created",
                "task.created",
                "task.updated",
                "task.updated",
                "task.deleted",
                "task.created",
                "task.completed",
                "task.created",
            ]
            # The first new event records the old task with its defaults, then the change.
            assert events[3]["before"]["priority"] == "none"
            assert events[3]["changes"] == {"priority": ["none", "high"], "tags": [[], ["legacy"]]}
            assert events[-1]["caused_by_seq"] == events[-2]["seq"]

            report = client.get(f"/api/{user_id}/audit-events/verify", headers=user.headers).json()
            assert report["ok"] is True and report["events"] == 8, report
            status, out, err = run_cli(settings, "audit", "verify", "--user", user_id)
            assert status == 0, out + err

            # An old task's history, as of before the upgrade, shows the defaults.
            as_of = client.get(
                user.url(f"/{old_ids[0]}/history"),
                params={"as_of": format_timestamp(events[2]["occurred_at"])},
                headers=user.headers,
            ).json()
            assert as_of["task"]["title"] == "Old one, renamed"
            assert (as_of["task"]["priority"], as_of["task"]["tags"]) == ("none", [])

        # Altering a version-1 event is still detected.
        with tampering(database.engine) as conn:
            conn.execute(
                sa.text(
                    "UPDATE audit_events SET after = jsonb_set(after, '{title}', '\"Forged\"') "
                    "WHERE user_id = :u AND seq = 2"
                ),
                {"u": user_id},
            )
        status, out, _ = run_cli(settings, "audit", "verify", "--user", user_id)
        assert status == 1 and "seq 2" in out
    finally:
        database.dispose()
