"""The one-statement write path (issue #10): the task change, the chain head and the audit event
in a single statement whose hash PostgreSQL computes, and what it must still guarantee.

- PostgreSQL's jsonb text and `audit.chain.jsonb_text` agree byte for byte on every kind of
  value an event holds, so the verifier recomputes the database's hashes;
- every kind of change writes its event in the same statement as the change;
- a failure after the statement rolls back both; a user's first writes, racing, make one head;
- one user's concurrent writers keep a gapless chain.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.append import TIMESTAMP_SQL_FORMAT
from audit.chain import HASH_VERSION, compute_hash, format_timestamp, jsonb_text
from audit.recorder import AuditContext
from audit.verify import verify_chain
from service.database import Database
from service.tasks import rules
from service.tasks.models import DESCRIPTION_MAX, TITLE_MAX, TaskCreate
from tests.audit_helpers import chain_head, events_of

CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f"
# What task text and event fields can hold (PostgreSQL refuses NUL in text and jsonb).
EDGE_VALUES: dict[str, Any] = {
    "ascii": "plain",
    "empty": "",
    "control characters": CONTROL,
    "quotes and backslashes": 'a "quoted" \\ back\\slash \\u0041 /',
    "unicode": "Zoë — naïve café, 東京, עברית, 🎉🏳️‍🌈, \u2028\u2029, \ufeff",
    "long text": "x" * 20_000 + "é" * 10_000,  # cut to the field's limit in task text
    "null": None,
    "booleans": [True, False],
    "integers": [0, -1, 2**31, 2**53 + 1, -(2**63)],
    "nested": {"b": [1, {"z": None, "a": ""}], "a": {}, "": []},
    # jsonb orders keys by length, then bytes: "é" (2 bytes) sorts after "z" (1 byte).
    "key order": {"é": 1, "z": 2, "aa": 3, "b": 4, "ab": 5, "Z": 6, "\U0001f389": 7},
}


@pytest.mark.parametrize("value", list(EDGE_VALUES.values()), ids=list(EDGE_VALUES))
def test_jsonb_text_is_what_postgresql_prints(database: Database, value: Any) -> None:
    document = {"value": value, "list": [value, value], "hash_version": HASH_VERSION}
    with database.engine.connect() as conn:
        printed, digest = conn.execute(
            sa.text(
                "SELECT CAST(CAST(:v AS jsonb) AS text), "
                "encode(sha256(convert_to(CAST(CAST(:v AS jsonb) AS text), 'UTF8')), 'hex')"
            ),
            {"v": json.dumps(document)},
        ).one()
    assert printed == jsonb_text(document)
    assert digest == hashlib.sha256(jsonb_text(document).encode()).hexdigest()


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 4, 18, 0, 0, 0, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 12, 4, 18, 0, 0, 999_999, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 30, 0, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2027, 6, 30, 23, 59, 59, 123_456, tzinfo=timezone(timedelta(hours=-8))),
    ],
)
def test_the_database_formats_timestamps_as_the_verifier(
    database: Database, moment: datetime
) -> None:
    with database.engine.connect() as conn:
        conn.execute(sa.text("SET TIME ZONE 'America/New_York'"))  # the session's zone is moot
        printed = conn.execute(
            sa.text("SELECT to_char(timezone('UTC', CAST(:t AS timestamptz)), :f)"),
            {"t": moment, "f": TIMESTAMP_SQL_FORMAT},
        ).scalar_one()
    assert printed == format_timestamp(moment)


# Task text through the API: (title, description). The API refuses control characters
# (service.text) except tab, line feed and carriage return in a description; rows holding
# others (written before that rule) hash as the jsonb test above shows.
EDGE_TEXTS = [(v, v) for v in EDGE_VALUES.values() if isinstance(v, str) and v and v != CONTROL] + [
    ("line breaks", "\t\ttab\r\nCRLF\nLF\rCR\n")
]


def test_every_kind_of_change_is_hashed_by_the_database_as_the_verifier_does(
    client: TestClient, user: Any, database: Database
) -> None:
    """Create, update, complete, reopen, a recurring completion (two events, one caused by the
    other), tag rename and delete, with edge-case text everywhere: each stored hash is the one
    `audit.chain` recomputes, and the chain verifies."""
    # Header bytes beyond ASCII arrive as latin-1 text: non-ASCII in the recorded user agent.
    headers = {**user.headers, "User-Agent": "Zoë's browser\t\xff ".encode()}
    ids = []
    for n, (title, description) in enumerate(EDGE_TEXTS):
        created = client.post(
            user.url(),
            json={
                "title": title[:TITLE_MAX],
                "description": description[-DESCRIPTION_MAX:],
                "priority": "high",
                "tags": [f"tag {n}", "Zoë"],
                "due_at": "2027-02-28T23:59:59.999999+05:30",
            },
            headers=headers,
        )
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    first = ids[0]
    steps = [
        client.put(user.url(f"/{first}"), json={"description": None}, headers=headers),
        client.patch(user.url(f"/{first}/complete"), headers=headers),
        client.patch(user.url(f"/{first}/complete"), headers=headers),  # reopens
        client.put(
            user.url(f"/{ids[1]}"),
            json={"recurrence": "FREQ=MONTHLY;BYMONTHDAY=31", "tags": []},
            headers=headers,
        ),
        client.put(user.url(f"/{ids[1]}"), json={"completed": True}, headers=headers),
        client.delete(user.url(f"/{ids[2]}"), headers=headers),
    ]
    assert [r.status_code for r in steps] == [200, 200, 200, 200, 200, 204]
    tags = client.get(f"/api/{user.user_id}/tags", headers=headers).json()
    zoe = next(tag for tag in tags if tag["name"] == "Zoë")
    renamed = client.patch(
        f"/api/{user.user_id}/tags/{zoe['id']}", json={"name": "Zoë ✓"}, headers=headers
    )
    assert renamed.status_code == 200, renamed.text

    events = events_of(database.engine, user.user_id)
    actions = Counter(e["action"] for e in events)
    assert actions["task.created"] == len(EDGE_TEXTS) + 1  # and the next occurrence
    assert {"task.updated", "task.completed", "task.reopened", "task.deleted"} <= set(actions)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for event in events:
        assert event["hash_version"] == HASH_VERSION
        assert compute_hash(event) == event["hash"], event["seq"]
    caused = [e for e in events if e["caused_by_seq"] is not None]
    assert len(caused) == 1 and caused[0]["action"] == "task.created"
    # The new task's id is the inserted row's: in the event's entity id and its state.
    for event in events:
        state = event["after"] or event["before"]
        assert state["id"] == int(event["entity_id"])
    assert chain_head(database.engine, user.user_id) == (events[-1]["seq"], events[-1]["hash"])
    with database.engine.connect() as conn:
        assert verify_chain(conn, user.user_id).ok


@contextmanager
def _statements(database: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(database.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", record)


def test_each_change_and_its_event_are_one_statement(
    client: TestClient, user: Any, database: Database
) -> None:
    """After a user's first write (which makes the chain head), a create, an update, a
    completion and a delete each touch audit_events in exactly one statement, which is also
    the one that changes the task."""
    first = client.post(user.url(), json={"title": "first"}, headers=user.headers)
    assert first.status_code == 201
    task_id = first.json()["id"]
    writes = {
        "create": lambda: client.post(
            user.url(), json={"title": "t", "tags": ["a"]}, headers=user.headers
        ),
        "update": lambda: client.put(
            user.url(f"/{task_id}"), json={"title": "u"}, headers=user.headers
        ),
        "complete": lambda: client.patch(user.url(f"/{task_id}/complete"), headers=user.headers),
        "delete": lambda: client.delete(user.url(f"/{task_id}"), headers=user.headers),
    }
    table = {"create": "INSERT INTO tasks", "update": "UPDATE tasks", "delete": "DELETE FROM tasks"}
    for name, write in writes.items():
        with _statements(database) as seen:
            assert write().status_code in (200, 201, 204)
        audited = [s for s in seen if "audit_events" in s]
        assert len(audited) == 1, (name, seen)
        assert table.get(name, "UPDATE tasks") in audited[0]
        assert "FOR UPDATE" in audited[0] and "sha256" in audited[0]
        # Nothing else touches the task or the chain head.
        others = [s for s in seen if s is not audited[0]]
        assert not [s for s in others if "audit_chain_heads" in s or "INTO tasks" in s], others


def test_a_failure_after_the_statement_rolls_back_the_task_and_its_event(
    client: TestClient, user: Any, database: Database
) -> None:
    assert client.post(user.url(), json={"title": "kept"}, headers=user.headers).status_code == 201
    head = chain_head(database.engine, user.user_id)
    ctx = AuditContext(actor_id=user.user_id)
    with pytest.raises(RuntimeError, match="after the write"), database.unit_of_work() as session:
        change = rules.create_task(session, ctx, user.user_id, TaskCreate(title="x"))
        assert change.event is not None and change.event.seq == 2
        raise RuntimeError("after the write")
    assert chain_head(database.engine, user.user_id) == head
    assert [e["seq"] for e in events_of(database.engine, user.user_id)] == [1]
    titles = [t["title"] for t in client.get(user.url(), headers=user.headers).json()]
    assert titles == ["kept"]


def test_a_users_first_writes_racing_make_one_head_and_a_gapless_chain(
    live_server: Any, make_user: Any, database: Database
) -> None:
    """Eight creates of a brand-new user at once: the first makes the chain head, the others
    wait for it; all succeed, with seqs 1..8."""
    user = make_user()
    start = threading.Barrier(8)

    def create(n: int) -> int:
        with live_server.client(headers=user.headers) as http:
            start.wait()
            return int(http.post(user.url(), json={"title": f"first {n}"}).status_code)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(create, range(8)))
    assert statuses == [201] * 8
    events = events_of(database.engine, user.user_id)
    assert [e["seq"] for e in events] == list(range(1, 9))
    with database.engine.connect() as conn:
        assert verify_chain(conn, user.user_id).ok


def test_one_users_concurrent_writers_keep_a_gapless_chain(
    live_server: Any, make_user: Any, database: Database
) -> None:
    """Eight writers on one user (creates, edits, completions, deletes): every acknowledged
    write has its event, the seqs have no gap, and the chain verifies."""
    user = make_user()
    writers, rounds = 8, 12
    start = threading.Barrier(writers)

    def write(worker: int) -> Counter[str]:
        done: Counter[str] = Counter()
        with live_server.client(headers=user.headers) as http:
            start.wait()
            for n in range(rounds):
                created = http.post(user.url(), json={"title": f"w{worker} n{n}", "tags": ["x"]})
                assert created.status_code == 201, created.text
                done["create"] += 1
                task = created.json()["id"]
                edited = http.put(user.url(f"/{task}"), json={"priority": "low"})
                assert edited.status_code == 200, edited.text
                done["update"] += 1
                if n % 2:
                    assert http.patch(user.url(f"/{task}/complete")).status_code == 200
                    done["complete"] += 1
                else:
                    assert http.delete(user.url(f"/{task}")).status_code == 204
                    done["delete"] += 1
        return done

    with ThreadPoolExecutor(max_workers=writers) as pool:
        done = sum(pool.map(write, range(writers)), Counter[str]())
    events = events_of(database.engine, user.user_id)
    assert len(events) == done.total() == writers * rounds * 3
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    actions = Counter(e["action"] for e in events)
    assert actions == {
        "task.created": done["create"],
        "task.updated": done["update"],
        "task.completed": done["complete"],
        "task.deleted": done["delete"],
    }
    with database.engine.connect() as conn:
        assert verify_chain(conn, user.user_id).ok
