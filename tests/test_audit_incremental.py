"""The verify endpoint checks only what was appended since its last successful check; the full
re-verification stays available (`?full=true`, the CLI). Tampering runs on a scratch database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import change, json_lines, run_cli, scratch_database, tamper, tampering
from tests.support import create_task


@pytest.fixture(scope="module")
def scratch_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="module")
def database(base_settings: Settings, scratch_url: str) -> Iterator[Database]:
    db = Database(build_engine(base_settings, scratch_url))
    yield db
    db.dispose()


@pytest.fixture
def settings(base_settings: Settings, scratch_url: str) -> Settings:
    return base_settings.model_copy(update={"database_url": scratch_url})


def verify(client: TestClient, user: Any, *, full: bool = False) -> dict[str, Any]:
    url = f"/api/{user.user_id}/audit-events/verify" + ("?full=true" if full else "")
    response = client.get(url, headers=user.headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def grow(client: TestClient, user: Any, task_id: int, count: int) -> None:
    for n in range(count):
        change(client, "PUT", f"/{task_id}", user, json={"title": f"Edit {n}"})


def stored_point(database: Database, user_id: str) -> tuple[int, str] | None:
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT seq, hash FROM audit_verified_heads WHERE user_id = :u"), {"u": user_id}
        ).first()
    return (int(row.seq), str(row.hash)) if row is not None else None


def test_each_call_checks_only_the_events_since_the_last_verified_one(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 4)  # seq 1..5
    first = verify(client, user)
    assert (first["ok"], first["events"], first["verified_from_seq"]) == (True, 5, 0)
    assert stored_point(database, user.user_id) == (5, first["head_hash"])

    grow(client, user, task["id"], 3)  # seq 6..8
    second = verify(client, user)
    assert (second["ok"], second["events"], second["verified_from_seq"]) == (True, 3, 5)
    assert second["head_seq"] == 8
    assert stored_point(database, user.user_id) == (8, second["head_hash"])

    nothing_new = verify(client, user)
    assert (nothing_new["ok"], nothing_new["events"], nothing_new["verified_from_seq"]) == (
        True,
        0,
        8,
    )
    # The explicit full check recomputes everything.
    full = verify(client, user, full=True)
    assert (full["ok"], full["events"], full["verified_from_seq"]) == (True, 8, 0)


def test_a_user_without_events_stores_no_point(
    client: TestClient, user: Any, database: Database
) -> None:
    report = verify(client, user)
    assert (report["ok"], report["events"], report["head_seq"]) == (True, 0, 0)
    assert stored_point(database, user.user_id) is None


def test_tampering_after_the_verified_point_is_found(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 2)  # seq 1..3
    assert verify(client, user)["ok"] is True
    grow(client, user, task["id"], 3)  # seq 4..6
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_events SET client_ip = '10.6.6.6' WHERE user_id = :u AND seq = 5"
            ),
            {"u": user.user_id},
        )
    report = verify(client, user)
    assert (report["ok"], report["first_bad_seq"], report["verified_from_seq"]) == (False, 5, 3)
    assert "seq 5: hash mismatch" in report["reason"]
    point = stored_point(database, user.user_id)
    assert point is not None and point[0] == 3
    # A failed check does not move the point: the next one still reports it.
    assert verify(client, user)["first_bad_seq"] == 5


def test_the_last_verified_event_must_be_unchanged(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 3)  # seq 1..4
    assert verify(client, user)["ok"] is True
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("UPDATE audit_events SET user_agent = 'forged' WHERE user_id = :u AND seq = 4"),
            {"u": user.user_id},
        )
    report = verify(client, user)
    assert (report["ok"], report["first_bad_seq"]) == (False, 4)
    assert "altered since it was last verified" in report["reason"]


def test_a_last_verified_event_that_cannot_be_hashed_is_reported(
    client: TestClient, user: Any, database: Database
) -> None:
    """A number past a float's range reads as infinity, which the hash's JSON cannot encode:
    the full check reports it, and so must the incremental one (it was a 500)."""
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 3)  # seq 1..4
    assert verify(client, user)["ok"] is True
    tamper(
        database.engine,
        user.user_id,
        "UPDATE audit_events SET changes = jsonb_set(changes, '{n}', "
        "(repeat('9', 400) || '.5')::jsonb) WHERE user_id = :u AND seq = 4",
    )
    report = verify(client, user)
    assert (report["ok"], report["first_bad_seq"]) == (False, 4)
    assert "altered since it was last verified" in report["reason"]


def test_deleting_the_verified_tail_is_found(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 3)  # seq 1..4
    assert verify(client, user)["ok"] is True
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq >= 3"),
            {"u": user.user_id},
        )
    report = verify(client, user)
    assert (report["ok"], report["first_bad_seq"]) == (False, 4)
    assert "the last verified event, is missing" in report["reason"]


def test_tampering_before_the_verified_point_needs_the_full_check(
    client: TestClient, user: Any, database: Database
) -> None:
    """What the incremental check does not do, by design: recompute verified events."""
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 4)  # seq 1..5
    assert verify(client, user)["ok"] is True
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_events SET client_ip = '10.6.6.6' WHERE user_id = :u AND seq = 2"
            ),
            {"u": user.user_id},
        )
    assert verify(client, user)["ok"] is True
    full = verify(client, user, full=True)
    assert (full["ok"], full["first_bad_seq"]) == (False, 2)


def test_verify_holds_one_pooled_connection_at_a_time(
    settings: Settings, user: Any, database: Database
) -> None:
    """The verified point is written on the request's own connection: with a pool of one,
    verify answered 503 after the pool timeout (it took a second connection for the write
    while holding the first)."""
    from tests.reliability_helpers import live, tracked_app

    with (
        tracked_app(settings, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=1) as app,
        live(app.app) as server,
        server.client() as http,
    ):
        task = create_task(http, user, "One")
        http.put(f"{user.url()}/{task['id']}", json={"title": "Two"}, headers=user.headers)
        url = f"/api/{user.user_id}/audit-events/verify"
        first = http.get(url, headers=user.headers)
        assert first.status_code == 200, first.text
        assert (first.json()["ok"], first.json()["events"]) == (True, 2)
        assert stored_point(database, user.user_id) == (2, first.json()["head_hash"])
        again = http.get(url, headers=user.headers).json()
        assert (again["events"], again["verified_from_seq"]) == (0, 2)


def drop_the_tail(database: Database, user_id: str, from_seq: int) -> None:
    """Delete the events from `from_seq` on and move the head back to match: the rest of the
    chain links up on its own."""
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq >= :s"),
            {"u": user_id, "s": from_seq},
        )
        conn.execute(
            sa.text(
                "UPDATE audit_chain_heads h SET seq = e.seq, hash = e.hash FROM audit_events e "
                "WHERE h.user_id = :u AND e.user_id = :u AND e.seq = :s"
            ),
            {"u": user_id, "s": from_seq - 1},
        )


def test_the_full_check_holds_the_chain_to_the_verified_point(
    client: TestClient, user: Any, database: Database, settings: Settings
) -> None:
    """Without the stored point the full check found nothing: seq 1..3 and the head agree."""
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 3)  # seq 1..4
    assert verify(client, user)["ok"] is True
    drop_the_tail(database, user.user_id, 4)

    incremental = verify(client, user)
    assert (incremental["ok"], incremental["first_bad_seq"]) == (False, 4)
    full = verify(client, user, full=True)
    assert (full["ok"], full["first_bad_seq"], full["events"]) == (False, 4, 3)
    assert "an earlier verification recorded its head at seq 4" in full["reason"]

    status, out, _ = run_cli(settings, "audit", "verify", "--user", user.user_id)
    assert status == 1
    (chain,) = [line for line in json_lines(out) if line["record"] == "chain"]
    assert (chain["ok"], chain["first_bad_seq"]) == (False, 4)
    status, out, _ = run_cli(settings, "audit", "verify", "--failures-only")
    failing = {line["user_id"]: line for line in json_lines(out) if line["record"] == "chain"}
    assert status == 1 and failing[user.user_id]["first_bad_seq"] == 4


def test_a_verified_chain_that_is_gone_fails(
    client: TestClient, user: Any, database: Database, settings: Settings
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 1)  # seq 1..2
    assert verify(client, user)["ok"] is True
    with tampering(database.engine) as conn:
        for table in ("audit_events", "audit_chain_heads"):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE user_id = :u"), {"u": user.user_id})

    full = verify(client, user, full=True)
    assert (full["ok"], full["first_bad_seq"], full["head_seq"]) == (False, 1, 0)
    status, out, _ = run_cli(settings, "audit", "verify", "--failures-only")
    failing = {line["user_id"]: line for line in json_lines(out) if line["record"] == "chain"}
    assert status == 1 and failing[user.user_id]["first_bad_seq"] == 1


def failed_at(database: Database, user_id: str) -> Any:
    with database.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT failed_at FROM audit_verified_heads WHERE user_id = :u"),
            {"u": user_id},
        ).scalar_one()


def set_client_ip(database: Database, user_id: str, seq: int, ip: str | None) -> None:
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("UPDATE audit_events SET client_ip = :ip WHERE user_id = :u AND seq = :s"),
            {"u": user_id, "s": seq, "ip": ip},
        )


def test_after_a_failed_full_check_the_incremental_one_fails_too(
    client: TestClient, user: Any, database: Database
) -> None:
    """It used to answer ok: it starts after the verified point, past the altered event."""
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 4)  # seq 1..5
    first = verify(client, user)
    assert first["ok"] is True
    original_ip = client_ip_of(database, user.user_id, 2)
    set_client_ip(database, user.user_id, 2, "10.6.6.6")
    assert verify(client, user, full=True)["first_bad_seq"] == 2

    again = verify(client, user)
    assert (again["ok"], again["first_bad_seq"], again["verified_from_seq"]) == (False, 2, 0)
    # The point is kept (it is evidence); the failure is recorded next to it.
    assert stored_point(database, user.user_id) == (5, first["head_hash"])
    assert failed_at(database, user.user_id) is not None

    # Once the chain is intact again, a check from seq 1 passes and clears the failure.
    set_client_ip(database, user.user_id, 2, original_ip)
    grow(client, user, task["id"], 1)  # seq 6
    passed = verify(client, user)
    assert (passed["ok"], passed["events"], passed["verified_from_seq"]) == (True, 6, 0)
    assert failed_at(database, user.user_id) is None
    assert stored_point(database, user.user_id) == (6, passed["head_hash"])
    assert verify(client, user)["verified_from_seq"] == 6


def test_a_failure_before_any_pass_is_recorded(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 1)  # seq 1..2
    set_client_ip(database, user.user_id, 1, "10.6.6.6")
    assert verify(client, user, full=True)["first_bad_seq"] == 1
    assert stored_point(database, user.user_id) == (0, "0" * 64)
    assert failed_at(database, user.user_id) is not None


def test_a_check_that_began_before_a_failure_cannot_clear_it(
    client: TestClient, user: Any, database: Database
) -> None:
    """A pass from an older snapshot, written after a failure was recorded, is dropped."""
    from audit.verified import record_outcome
    from audit.verify import stored_point as read_point
    from audit.verify import verify_chain

    task = create_task(client, user, "Start")
    grow(client, user, task["id"], 2)  # seq 1..3
    assert verify(client, user)["ok"] is True
    grow(client, user, task["id"], 2)  # seq 4..5
    with database.engine.connect() as conn:
        seen = read_point(conn, user.user_id)
        older = verify_chain(conn, user.user_id, resume=True)
    assert older.ok and older.head_seq == 5
    set_client_ip(database, user.user_id, 4, "10.6.6.6")
    assert verify(client, user)["first_bad_seq"] == 4

    with database.engine.begin() as conn:
        record_outcome(conn, user.user_id, seen, older)
    assert stored_point(database, user.user_id) == (3, seen.hash if seen else None)
    assert verify(client, user)["first_bad_seq"] == 4


def client_ip_of(database: Database, user_id: str, seq: int) -> Any:
    with database.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT client_ip FROM audit_events WHERE user_id = :u AND seq = :s"),
            {"u": user_id, "s": seq},
        ).scalar_one()
