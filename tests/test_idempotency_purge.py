"""Expired Idempotency-Keys are purged in small batches in the background: the table stays
bounded while keys keep coming, and the purge never waits on a key in use."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import Database
from service.settings import Settings
from service.sqltypes import utcnow
from service.tasks.idempotency import purge_expired
from tests.support import ApiUser


def _insert_keys(database: Database, user_id: str, count: int, age: timedelta) -> None:
    with database.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, "
                "response_body, created_at) VALUES (:u, :k, repeat('0', 64), 201, '{}', :t)"
            ),
            [{"u": user_id, "k": f"key-{n}", "t": utcnow() - age} for n in range(count)],
        )


def _count(database: Database, user_id: str) -> int:
    with database.engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM idempotency_keys WHERE user_id = :u"), {"u": user_id}
            ).scalar_one()
        )


def test_purge_deletes_expired_keys_in_bounded_batches(database: Database, make_user) -> None:  # type: ignore[no-untyped-def]
    old, fresh = make_user(), make_user()
    _insert_keys(database, old.user_id, 35, age=timedelta(days=3))
    _insert_keys(database, fresh.user_id, 5, age=timedelta(minutes=1))
    retention = timedelta(days=1)
    # Each call does at most max_batches transactions of batch_size rows.
    assert purge_expired(database.engine, retention, batch_size=10, max_batches=2) == 20
    purge_expired(database.engine, retention, batch_size=10)
    assert _count(database, old.user_id) == 0
    assert _count(database, fresh.user_id) == 5


def test_purge_skips_a_key_in_use_instead_of_waiting(database: Database, make_user) -> None:  # type: ignore[no-untyped-def]
    user = make_user()
    _insert_keys(database, user.user_id, 3, age=timedelta(days=3))
    with database.engine.connect() as holder:
        holder.execute(
            sa.text(
                "SELECT 1 FROM idempotency_keys WHERE user_id = :u AND key = 'key-0' FOR UPDATE"
            ),
            {"u": user.user_id},
        )
        done: list[int] = []
        worker = threading.Thread(
            target=lambda: done.append(purge_expired(database.engine, timedelta(days=1)))
        )
        worker.start()
        worker.join(timeout=10)
        assert done, "the purge waited for the locked key"
        assert _count(database, user.user_id) == 1  # only the locked one is left
        holder.rollback()
    purge_expired(database.engine, timedelta(days=1))
    assert _count(database, user.user_id) == 0


def test_table_stays_bounded_while_keys_keep_coming(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """Keys live 1 s and the purge runs every 0.2 s: whatever the request rate, at any time
    only the keys of the last seconds are left."""
    short = settings.model_copy(
        update={"idempotency_retention_seconds": 1, "idempotency_purge_interval_seconds": 0.2}
    )
    created_at: list[float] = []
    samples: list[tuple[float, int]] = []
    with TestClient(create_app(short, database), raise_server_exceptions=False) as client:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 5:
            headers = {**user.headers, "Idempotency-Key": f"k-{n}"}
            response = client.post(user.url(), json={"title": f"t{n}"}, headers=headers)
            assert response.status_code == 201
            created_at.append(time.monotonic())
            n += 1
            if n % 20 == 0:
                samples.append((time.monotonic(), _count(database, user.user_id)))
        for at, count in samples:
            if at - started < 3:
                continue
            # Everything older than retention + interval + slack for a loaded machine is gone.
            recent = sum(1 for t in created_at if t > at - 2.5)
            assert count <= recent, (count, recent, len(created_at))
        # After the writes stop, the rest expires too.
        deadline = time.monotonic() + 10
        while _count(database, user.user_id):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert len(created_at) > 40  # enough traffic for the bound to mean something
