"""Chain verification, by the API and by `todo-api audit verify`, on intact and tampered chains.

Tampering needs the append-only triggers off, so this module runs on a database of its own:
the shared test database must keep verifying for every other test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.chain import compute_hash
from audit.verify import verify_chain
from service.app import create_app
from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import (
    change,
    events_of,
    json_lines,
    run_cli,
    scratch_database,
    tamper,
    tampering,
)
from tests.feed_helpers import FeedReader, wait_listening
from tests.support import ApiUser, LiveServer, create_task

REPO = Path(__file__).resolve().parent.parent
CHAIN_LENGTH = 6


@pytest.fixture(scope="module")
def scratch_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="module")
def database(base_settings: Settings, scratch_url: str) -> Iterator[Database]:
    """Overrides the shared database for this module (and so `app`, `client`, ...)."""
    db = Database(build_engine(base_settings, scratch_url))
    yield db
    db.dispose()


@pytest.fixture
def settings(base_settings: Settings, scratch_url: str) -> Settings:
    return base_settings.model_copy(update={"database_url": scratch_url})


def make_chain(client: TestClient, user: Any, length: int = CHAIN_LENGTH) -> None:
    task = create_task(client, user, "Step 1")
    for n in range(2, length + 1):
        change(client, "PUT", f"/{task['id']}", user, json={"title": f"Step {n}"})


def api_verify(client: TestClient, user: Any, *, full: bool = False) -> dict[str, Any]:
    url = f"/api/{user.user_id}/audit-events/verify" + ("?full=true" if full else "")
    response = client.get(url, headers=user.headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


# --- intact chains ----------------------------------------------------------------------


def test_an_intact_chain_verifies(client: TestClient, user: Any, database: Database) -> None:
    make_chain(client, user)
    last = events_of(database.engine, user.user_id)[-1]
    assert api_verify(client, user) == {
        "ok": True,
        "events": CHAIN_LENGTH,
        "head_seq": CHAIN_LENGTH,
        "head_hash": last["hash"],
        "first_bad_seq": None,
        "reason": None,
        "verified_from_seq": 0,
    }
    status, out, _ = run_cli(database_settings(database), "audit", "verify", "--user", user.user_id)
    assert status == 0
    chain, summary = json_lines(out)
    full = api_verify(client, user, full=True)
    assert chain == {"record": "chain", "user_id": user.user_id, **full}
    assert summary == {"record": "summary", "ok": True, "chains": 1, "events": 6, "failed": 0}


def test_a_user_without_events_verifies(client: TestClient, user: Any, database: Database) -> None:
    assert api_verify(client, user) == {
        "ok": True,
        "events": 0,
        "head_seq": 0,
        "head_hash": None,
        "first_bad_seq": None,
        "reason": None,
        "verified_from_seq": 0,
    }
    settings = database_settings(database)
    status, out, _ = run_cli(settings, "audit", "verify", "--user", user.user_id)
    assert status == 0, out
    assert json_lines(out)[-1] == {
        "record": "summary",
        "ok": True,
        "chains": 1,
        "events": 0,
        "failed": 0,
    }


def test_verifying_a_user_never_seen_is_a_usage_error(database: Database) -> None:
    """A mistyped id reported an intact chain of 0 events, like a user who never wrote."""
    status, out, err = run_cli(database_settings(database), "audit", "verify", "--user", "nobody")
    assert (status, out) == (2, "")
    assert err.strip() == "todo-api: no user 'nobody' and no audit chain"


def test_verification_streams_in_batches(client: TestClient, user: Any, database: Database) -> None:
    make_chain(client, user, 7)
    with database.engine.connect() as conn:
        for size in (1, 2, 3, 7, 1000):
            report = verify_chain(conn, user.user_id, batch_size=size)
            assert (report.ok, report.events, report.head_seq) == (True, 7, 7)


def database_settings(database: Database) -> Settings:
    url = database.engine.url.render_as_string(hide_password=False)
    return Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]


# --- tampered chains ----------------------------------------------------------------------

Tamper = Callable[[sa.Connection, str, list[dict[str, Any]]], None]


def _sql(statement: str) -> Tamper:
    def tamper(conn: sa.Connection, user_id: str, _: list[dict[str, Any]]) -> None:
        conn.execute(sa.text(statement), {"u": user_id})

    return tamper


def _edit_and_rehash(conn: sa.Connection, user_id: str, events: list[dict[str, Any]]) -> None:
    """Edit seq 3 and give it a matching hash: seq 3 is consistent, its link from seq 4 is not."""
    event = {**events[2], "after": {**events[2]["after"], "title": "Forged"}}
    conn.execute(
        sa.text(
            "UPDATE audit_events SET after = CAST(:after AS jsonb), hash = :hash "
            "WHERE user_id = :u AND seq = 3"
        ),
        {"after": json.dumps(event["after"]), "hash": compute_hash(event), "u": user_id},
    )


# Through seqs far above the chain (a seq below 1 is refused by a CHECK constraint).
SWAP_3_4 = (
    "UPDATE audit_events SET seq = CASE seq WHEN 3 THEN 1000004 ELSE 1000003 END "
    "WHERE user_id = :u AND seq IN (3, 4);"
    "UPDATE audit_events SET seq = seq - 1000000 WHERE user_id = :u AND seq > 1000000"
)

TAMPERS: dict[str, tuple[Tamper, int | None, str]] = {
    "edit content": (
        _sql(
            "UPDATE audit_events SET after = jsonb_set(after, '{title}', '\"Forged\"') "
            "WHERE user_id = :u AND seq = 3"
        ),
        3,
        "seq 3: hash mismatch",
    ),
    "edit metadata": (
        _sql("UPDATE audit_events SET client_ip = '10.6.6.6' WHERE user_id = :u AND seq = 2"),
        2,
        "seq 2: hash mismatch",
    ),
    "edit and rehash": (_edit_and_rehash, 4, "seq 4: prev_hash does not match the hash of seq 3"),
    "edit prev_hash": (
        _sql("UPDATE audit_events SET prev_hash = repeat('a', 64) WHERE user_id = :u AND seq = 5"),
        5,
        "seq 5: prev_hash does not match",
    ),
    "delete middle": (
        _sql("DELETE FROM audit_events WHERE user_id = :u AND seq = 3"),
        3,
        "seq 3 is missing",
    ),
    "delete first": (
        _sql("DELETE FROM audit_events WHERE user_id = :u AND seq = 1"),
        1,
        "seq 1 is missing",
    ),
    "delete tail": (
        _sql("DELETE FROM audit_events WHERE user_id = :u AND seq >= 5"),
        5,
        "seqs 5 to 6 are missing (the chain head is at seq 6)",
    ),
    "delete newest": (
        _sql("DELETE FROM audit_events WHERE user_id = :u AND seq = 6"),
        6,
        "seq 6 is missing (the chain head is at seq 6)",
    ),
    "delete all": (
        _sql("DELETE FROM audit_events WHERE user_id = :u"),
        1,
        "seqs 1 to 6 are missing",
    ),
    "reorder by seq": (_sql(SWAP_3_4), 3, "seq 3: prev_hash does not match"),
    "reorder by time": (
        _sql(
            "UPDATE audit_events e SET occurred_at = o.occurred_at FROM audit_events o "
            "WHERE e.user_id = :u AND o.user_id = :u AND "
            "((e.seq = 3 AND o.seq = 4) OR (e.seq = 4 AND o.seq = 3))"
        ),
        3,
        "seq 3: hash mismatch",
    ),
    "renumber": (
        _sql("UPDATE audit_events SET seq = seq + 1 WHERE user_id = :u AND seq = 6"),
        6,
        "seq 6 is missing (found seq 7 next)",
    ),
    "move to another chain": (
        _sql("UPDATE audit_events SET user_id = 'elsewhere' WHERE user_id = :u AND seq = 2"),
        2,
        "seq 2 is missing",
    ),
    # Times PostgreSQL holds and Python's datetime does not (years 1 to 9999 only).
    "time before year 1": (
        _sql(
            "UPDATE audit_events SET occurred_at = '0044-03-15 12:00:00+00 BC' "
            "WHERE user_id = :u AND seq = 4"
        ),
        4,
        "seq 4: hash mismatch",
    ),
    "time past year 9999": (
        _sql(
            "UPDATE audit_events SET occurred_at = '12026-01-01 00:00:00+00' "
            "WHERE user_id = :u AND seq = 4"
        ),
        4,
        "seq 4: hash mismatch",
    ),
    # Nested within what the row's reading (json.loads) takes, past what hashing recurses into.
    "changes nested deep": (
        _sql(
            "UPDATE audit_events SET changes = (repeat('[', 600) || repeat(']', 600))::jsonb "
            "WHERE user_id = :u AND seq = 4"
        ),
        4,
        "seq 4: cannot be encoded for hashing",
    ),
    "unknown hash version": (
        _sql("UPDATE audit_events SET hash_version = 99 WHERE user_id = :u AND seq = 4"),
        4,
        "unknown hash_version 99",
    ),
    "head hash": (
        _sql("UPDATE audit_chain_heads SET hash = repeat('f', 64) WHERE user_id = :u"),
        6,
        "the chain head's hash differs",
    ),
    "head rewound": (
        _sql("UPDATE audit_chain_heads SET seq = 4 WHERE user_id = :u"),
        5,
        "the chain head is at seq 4 but events go up to 6",
    ),
    "head deleted": (
        _sql("DELETE FROM audit_chain_heads WHERE user_id = :u"),
        None,
        "the chain head record is missing",
    ),
}


@pytest.fixture
def bystander(client: TestClient, make_user: Any) -> Any:
    """Another user's intact chain, next to the one being tampered with."""
    other = make_user()
    make_chain(client, other, 3)
    return other


@pytest.mark.parametrize("name", TAMPERS)
def test_tampering_is_found_at_the_first_bad_seq(
    client: TestClient, user: Any, bystander: Any, database: Database, name: str
) -> None:
    tamper, first_bad, reason = TAMPERS[name]
    make_chain(client, user)
    assert api_verify(client, user)["ok"] is True
    events = events_of(database.engine, user.user_id)
    with tampering(database.engine) as conn:
        tamper(conn, user.user_id, events)

    # The full re-verification finds it wherever it is (the incremental check starts after the
    # last verified event: tests/test_audit_incremental.py).
    report = api_verify(client, user, full=True)
    assert report["ok"] is False
    assert report["first_bad_seq"] == first_bad
    assert reason in report["reason"]

    status, out, _ = run_cli(database_settings(database), "audit", "verify", "--user", user.user_id)
    assert status == 1
    chain, summary = json_lines(out)
    assert chain == {"record": "chain", "user_id": user.user_id, **report}
    assert summary["ok"] is False and summary["failed"] == 1
    # Small batches find the same seq (the break may straddle a batch boundary).
    with database.engine.connect() as conn:
        for size in (1, 2, 4):
            streamed = verify_chain(conn, user.user_id, batch_size=size)
            assert (streamed.ok, streamed.first_bad_seq) == (False, first_bad)
    # Other chains are untouched.
    assert api_verify(client, bystander)["ok"] is True


def test_a_state_altered_out_of_shape_is_still_served_as_of_its_time(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    """A task's `as_of` reads its last event's `after`: one made to lack the title by hand
    is served as recorded (it was a 500), and the verification names the event."""
    make_chain(client, user, 2)
    tamper(
        database.engine,
        user.user_id,
        "UPDATE audit_events SET after = after - 'title' WHERE user_id = :u AND seq = 2",
    )
    items = client.get(f"/api/{user.user_id}/audit-events", headers=user.headers).json()["items"]
    altered = next(item for item in items if item["seq"] == 2)
    resp = client.get(
        f"/api/{user.user_id}/tasks/{altered['entity_id']}/history",
        params={"as_of": "2999-01-01T00:00:00Z"},
        headers=user.headers,
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json()["event_seq"], resp.json()["task"]) == (2, altered["after"])
    assert "title" not in resp.json()["task"]
    report = api_verify(client, user, full=True)
    assert (report["ok"], report["first_bad_seq"]) == (False, 2)


def test_an_event_altered_out_of_shape_is_still_served_and_reported(
    client: TestClient, user: ApiUser, settings: Settings, database: Database
) -> None:
    """Reads serve events as stored: one whose `changes` was made a non-object by hand, or
    whose time is one Python cannot hold, must not make the log or the task's history a 500,
    nor cut the change feed off at every reconnect (each did); the verification names it."""
    make_chain(client, user, 3)
    tamper(
        database.engine,
        user.user_id,
        "UPDATE audit_events SET changes = '[\"forged\"]' WHERE user_id = :u AND seq = 2",
        "UPDATE audit_events SET occurred_at = '0044-03-15 12:00:00+00 BC' "
        "WHERE user_id = :u AND seq = 3",
    )
    listed = client.get(f"/api/{user.user_id}/audit-events", headers=user.headers)
    assert listed.status_code == 200, listed.text
    items = list(reversed(listed.json()["items"]))
    assert [item["changes"] for item in items][1] == ["forged"]
    # The earlier of the two bounds a day inside Python's years (service.sqltypes).
    assert items[2]["occurred_at"] == "0001-01-02T00:00:00.000000Z"
    history = client.get(
        f"/api/{user.user_id}/tasks/{items[0]['entity_id']}/history", headers=user.headers
    )
    assert history.status_code == 200, history.text
    assert history.json()["items"] == items

    app = create_app(settings, database)
    with LiveServer(app) as server:
        wait_listening(app)
        path = f"/api/{user.user_id}/events"
        with FeedReader(server.url, path, headers=user.headers) as reader:
            reader.wait_for_seq(3)
    assert [event.json() for event in reader.task_events] == items

    report = api_verify(client, user, full=True)
    assert (report["ok"], report["first_bad_seq"]) == (False, 2)
    assert "seq 2: hash mismatch" in report["reason"]


def test_the_triggers_are_back_after_tampering(database: Database) -> None:
    with database.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT tgname, tgenabled FROM pg_trigger "
                "WHERE tgrelid = 'audit_events'::regclass AND NOT tgisinternal"
            )
        ).all()
    assert dict(rows) == {
        "audit_events_append_only": "A",
        "audit_events_no_truncate": "A",
        "audit_events_notify": "A",
    }


def test_cli_checks_every_chain(client: TestClient, make_user: Any, database: Database) -> None:
    good, bad = make_user(), make_user()
    make_chain(client, good, 2)
    make_chain(client, bad, 3)
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq = 2"), {"u": bad.user_id}
        )
    settings = database_settings(database)

    status, out, _ = run_cli(settings, "audit", "verify")
    assert status == 1
    lines = json_lines(out)
    chains = {line["user_id"]: line for line in lines if line["record"] == "chain"}
    assert chains[good.user_id]["ok"] is True
    assert chains[bad.user_id]["ok"] is False and chains[bad.user_id]["first_bad_seq"] == 2
    assert lines[-1]["record"] == "summary" and lines[-1]["chains"] == len(chains)
    assert lines[-1]["failed"] == sum(not c["ok"] for c in chains.values()) >= 1

    status, out, _ = run_cli(settings, "audit", "verify", "--failures-only")
    assert status == 1
    failing = {line["user_id"] for line in json_lines(out) if line["record"] == "chain"}
    assert bad.user_id in failing and good.user_id not in failing


def test_cli_passes_when_every_chain_verifies(base_settings: Settings, make_user: Any) -> None:
    """On a database of its own, where no other test has broken a chain."""
    with scratch_database() as url:
        settings = base_settings.model_copy(update={"database_url": url})
        db = Database(build_engine(settings))
        try:
            users = [make_user() for _ in range(3)]
            with TestClient(create_app(settings, db)) as client:
                for n, user in enumerate(users):
                    make_chain(client, user, n + 1)
            status, out, _ = run_cli(settings, "audit", "verify")
            assert status == 0
            lines = json_lines(out)
            assert {line["user_id"]: line["events"] for line in lines[:-1]} == {
                u.user_id: n + 1 for n, u in enumerate(users)
            }
            assert lines[-1] == {
                "record": "summary",
                "ok": True,
                "chains": 3,
                "events": 6,
                "failed": 0,
            }
            # A chain whose head row is gone is still found, through its events.
            with tampering(db.engine) as conn:
                conn.execute(
                    sa.text("DELETE FROM audit_chain_heads WHERE user_id = :u"),
                    {"u": users[1].user_id},
                )
            status, out, _ = run_cli(settings, "audit", "verify", "--failures-only")
            assert status == 1
            (line, summary) = json_lines(out)
            assert line["user_id"] == users[1].user_id
            assert line["reason"] == "the chain head record is missing"
            assert summary["chains"] == 3
        finally:
            db.dispose()


# --- exports as anchors -----------------------------------------------------------------------


def _forge_from(conn: sa.Connection, user_id: str, seq: int) -> None:
    """A forgery plain verification cannot see: rewrite seq onwards and re-hash to the head."""
    rows = [
        dict(r._mapping)
        for r in conn.execute(
            sa.text("SELECT * FROM audit_events WHERE user_id = :u ORDER BY seq"), {"u": user_id}
        )
    ]
    prev = rows[seq - 2]["hash"]
    for row in rows[seq - 1 :]:
        if row["seq"] == seq:
            row["after"] = {**row["after"], "title": "Rewritten history"}
        row["prev_hash"] = prev
        row["hash"] = compute_hash(row)
        conn.execute(
            sa.text(
                "UPDATE audit_events SET after = CAST(:after AS jsonb), prev_hash = :prev, "
                "hash = :hash WHERE id = :id"
            ),
            {"after": json.dumps(row["after"]), "prev": prev, "hash": row["hash"], "id": row["id"]},
        )
        prev = row["hash"]
    conn.execute(
        sa.text("UPDATE audit_chain_heads SET hash = :h WHERE user_id = :u"),
        {"h": prev, "u": user_id},
    )


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_an_export_anchors_a_later_verify(
    client: TestClient, user: Any, database: Database, tmp_path: Path, fmt: str
) -> None:
    settings = database_settings(database)
    make_chain(client, user, 4)
    export = tmp_path / f"audit.{fmt}"
    status, _, _ = run_cli(
        settings,
        "audit",
        "export",
        "--user",
        user.user_id,
        "--format",
        fmt,
        "--output",
        str(export),
    )
    assert status == 0
    # The chain grows after the export: still consistent with it.
    task = create_task(client, user, "After the export")
    change(client, "DELETE", f"/{task['id']}", user)
    verify = ("audit", "verify", "--user", user.user_id, "--against", str(export))
    status, out, _ = run_cli(settings, *verify)
    assert status == 0, out
    assert json_lines(out)[0]["head_seq"] == 6

    with tampering(database.engine) as conn:
        _forge_from(conn, user.user_id, 2)
    # Self-consistent again, so a plain verify passes ...
    assert api_verify(client, user)["ok"] is True
    # ... but the export remembers seq 4's hash.
    status, out, _ = run_cli(settings, *verify)
    assert status == 1
    chain = json_lines(out)[0]
    assert chain["first_bad_seq"] == 4
    assert "differs from the one an export recorded" in chain["reason"]
    status, out, _ = run_cli(settings, "audit", "verify", "--against", str(export))
    assert status == 1


INCOMPLETE = "the export is incomplete"


def test_verify_against_a_truncated_chain_or_bad_file(
    client: TestClient, user: Any, database: Database, tmp_path: Path
) -> None:
    settings = database_settings(database)
    make_chain(client, user, 3)
    export = tmp_path / "audit.ndjson"
    args = ("audit", "export", "--user", user.user_id, "--format", "ndjson")
    assert run_cli(settings, *args, "--output", str(export))[0] == 0
    with tampering(database.engine) as conn:
        conn.execute(sa.text("DELETE FROM audit_events WHERE user_id = :u"), {"u": user.user_id})
        conn.execute(
            sa.text("DELETE FROM audit_chain_heads WHERE user_id = :u"), {"u": user.user_id}
        )
    # Gone without a trace in the database, but the export knew the chain.
    assert api_verify(client, user)["ok"] is True
    status, out, _ = run_cli(
        settings, "audit", "verify", "--user", user.user_id, "--against", str(export)
    )
    assert status == 1
    assert json_lines(out)[0]["reason"] == (
        "the chain ends at seq 0 but an export recorded its head at seq 3"
    )

    # A file that is not a whole export is a usage error (2), not a finding (1).
    cut = tmp_path / "cut.ndjson"
    cut.write_text("".join(export.read_text().splitlines(keepends=True)[:-1]))
    status, out, err = run_cli(settings, "audit", "verify", "--against", str(cut))
    assert (status, out) == (2, "")
    assert err == f"todo-api: cannot use {cut} as an export: no closing record: {INCOMPLETE}\n"
    missing = tmp_path / "missing.ndjson"
    status, out, err = run_cli(settings, "audit", "verify", "--against", str(missing))
    assert (status, out) == (2, "")
    assert err == f"todo-api: cannot read {missing}: No such file or directory\n"


def test_the_installed_command(client: TestClient, user: Any, database: Database) -> None:
    """`todo-api audit verify` as an operator runs it: a broken chain is a nonzero exit."""
    make_chain(client, user, 3)
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text("UPDATE audit_events SET action = 'x' WHERE user_id = :u AND seq = 2"),
            {"u": user.user_id},
        )
    env = {
        **os.environ,
        "DATABASE_URL": database.engine.url.render_as_string(hide_password=False),
    }
    command = [str(Path(sys.executable).parent / "todo-api"), "audit", "verify"]
    done = subprocess.run(
        [*command, "--user", user.user_id],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    chain, summary = json_lines(done.stdout)
    assert (chain["user_id"], chain["first_bad_seq"]) == (user.user_id, 2)
    assert summary["ok"] is False


def test_a_failed_verification_logs_one_warning(
    client: TestClient,
    user: Any,
    bystander: Any,
    database: Database,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It was only the access line, INFO with status 200. (Counted: tests/test_metrics.py.)"""
    make_chain(client, user, 3)
    with tampering(database.engine) as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_events SET client_ip = '10.6.6.6' WHERE user_id = :u AND seq = 2"
            ),
            {"u": user.user_id},
        )
    capsys.readouterr()
    assert api_verify(client, bystander)["ok"] is True  # a pass logs no warning
    full = api_verify(client, user, full=True)
    incremental = api_verify(client, user)
    out = capsys.readouterr().out

    warnings = [line for line in json_lines(out) if line["level"] == "WARNING"]
    assert [(w["logger"], w["message"], w["mode"]) for w in warnings] == [
        ("audit.verify", "audit chain verification failed", "full"),
        ("audit.verify", "audit chain verification failed", "incremental"),
    ]
    for warning, report in zip(warnings, (full, incremental), strict=True):
        assert warning["user_id"] == user.user_id
        assert (warning["first_bad_seq"], warning["reason"]) == (2, report["reason"])
    assert user.token not in out
