"""The database's own guards: audit_events is append-only, and no task changes without an event.

These run as the PostgreSQL superuser, also with `session_replication_role = replica` (which
silences ordinary triggers): the guards are ENABLE ALWAYS, so nothing gets past them.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.recorder import AuditContext
from service.database import Database
from service.tasks import rules
from service.tasks.models import TaskUpdate
from tests.audit_helpers import chain_head, events_of, scratch_database
from tests.support import create_task

APPEND_ONLY = {
    "update": "UPDATE audit_events SET action = 'task.forged' WHERE id = :id",
    "delete": "DELETE FROM audit_events WHERE id = :id",
    "truncate": "TRUNCATE audit_events",
}
RAW_TASK_CHANGES = {
    "update": "UPDATE tasks SET title = 'Sneaky' WHERE id = :id",
    "delete": "DELETE FROM tasks WHERE id = :id",
    "insert": "INSERT INTO tasks (user_id, title, created_at, updated_at) "
    "SELECT user_id, 'Sneaky', now(), now() FROM tasks WHERE id = :id",
}


def test_guard_triggers_fire_always(database: Database) -> None:
    with database.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT tgname, tgenabled FROM pg_trigger WHERE tgname IN "
                "('audit_events_append_only', 'audit_events_no_truncate', 'tasks_audit_guard', "
                "'task_tags_audit_guard', 'tags_audit_guard', 'task_tags_no_truncate', "
                "'tags_no_truncate')"
            )
        ).all()
    assert {name: enabled for name, enabled in rows} == {
        "audit_events_append_only": "A",
        "audit_events_no_truncate": "A",
        "tasks_audit_guard": "A",
        "task_tags_audit_guard": "A",
        "tags_audit_guard": "A",
        "task_tags_no_truncate": "A",
        "tags_no_truncate": "A",
    }


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("statement", APPEND_ONLY)
def test_audit_events_refuse_update_delete_and_truncate(
    client: TestClient, user: Any, database: Database, statement: str, replica: bool
) -> None:
    create_task(client, user, "Audited")
    events = events_of(database.engine, user.user_id)
    with database.engine.connect() as conn, conn.begin():
        if replica:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        with pytest.raises(sa.exc.DBAPIError) as excinfo:
            conn.execute(sa.text(APPEND_ONLY[statement]), {"id": events[0]["id"]})
    assert excinfo.value.orig.pgcode == "42501"  # insufficient_privilege
    assert "audit_events is append-only" in str(excinfo.value.orig)
    assert events_of(database.engine, user.user_id) == events


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("statement", RAW_TASK_CHANGES)
def test_task_change_without_audit_event_fails_at_commit(
    client: TestClient, user: Any, database: Database, statement: str, replica: bool
) -> None:
    task = create_task(client, user, "Guarded")
    with database.engine.connect() as conn:
        transaction = conn.begin()
        if replica:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        # The statement itself goes through; the deferred guard stops the commit.
        assert conn.execute(sa.text(RAW_TASK_CHANGES[statement]), {"id": task["id"]}).rowcount == 1
        with pytest.raises(sa.exc.IntegrityError) as excinfo:
            transaction.commit()
    assert excinfo.value.orig.pgcode == "23000"  # integrity_constraint_violation
    assert "without an audit event in the same transaction" in str(excinfo.value.orig)
    listed = client.get(user.url(), headers=user.headers).json()
    assert listed == [task]


RAW_TAG_CHANGES = {
    "link": "INSERT INTO task_tags (task_id, tag_id, user_id) VALUES (:task, :spare, :user)",
    "unlink": "DELETE FROM task_tags WHERE task_id = :task AND tag_id = :tag",
    "relink": "UPDATE task_tags SET tag_id = :spare WHERE task_id = :task AND tag_id = :tag",
    "rename tag": "UPDATE tags SET name = 'Sneaky' WHERE id = :tag",
    "delete tag": "DELETE FROM tags WHERE id = :tag",
}


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("statement", RAW_TAG_CHANGES)
def test_a_change_of_a_tasks_tags_without_audit_event_fails_at_commit(
    client: TestClient, user: Any, database: Database, statement: str, replica: bool
) -> None:
    """The tags are part of the task's recorded state: its links, and the names of its tags."""
    task = create_task(client, user, "Tagged", tags=["kept"])
    spare = client.post(f"/api/{user.user_id}/tags", json={"name": "spare"}, headers=user.headers)
    tags = {
        t["name"]: t["id"]
        for t in client.get(f"/api/{user.user_id}/tags", headers=user.headers).json()
    }
    params = {
        "task": task["id"],
        "tag": tags["kept"],
        "spare": spare.json()["id"],
        "user": user.user_id,
    }
    with database.engine.connect() as conn:
        transaction = conn.begin()
        if replica:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        assert conn.execute(sa.text(RAW_TAG_CHANGES[statement]), params).rowcount == 1
        with pytest.raises(sa.exc.IntegrityError) as excinfo:
            transaction.commit()
    assert excinfo.value.orig.pgcode == "23000"  # integrity_constraint_violation
    assert "without an audit event" in str(excinfo.value.orig)
    assert client.get(user.url(f"/{task['id']}"), headers=user.headers).json() == task


def test_a_tag_no_task_carries_can_be_renamed_directly(
    client: TestClient, user: Any, database: Database
) -> None:
    """No task's state changes, so there is nothing to record."""
    tag = client.post(f"/api/{user.user_id}/tags", json={"name": "unused"}, headers=user.headers)
    with database.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tags SET name = 'Unused' WHERE id = :id"), tag.json())
    got = client.get(f"/api/{user.user_id}/tags/{tag.json()['id']}", headers=user.headers)
    assert got.json()["name"] == "Unused"


def test_an_event_for_another_task_does_not_cover_a_change(
    client: TestClient, user: Any, database: Database
) -> None:
    first = create_task(client, user, "First")
    second = create_task(client, user, "Second")
    head = chain_head(database.engine, user.user_id)
    ctx = AuditContext(actor_id=user.user_id)
    with pytest.raises(sa.exc.IntegrityError), database.unit_of_work() as session:
        session.execute(sa.text("UPDATE tasks SET title = 'Sneaky' WHERE id = :id"), first)
        rules.update_task(session, ctx, user.user_id, second["id"], TaskUpdate(title="Legit"))
    titles = {t["id"]: t["title"] for t in client.get(user.url(), headers=user.headers).json()}
    assert titles == {first["id"]: "First", second["id"]: "Second"}
    assert chain_head(database.engine, user.user_id) == head


def test_every_api_write_passes_the_guard(
    client: TestClient, user: Any, database: Database
) -> None:
    """Each write path commits, each with its own event."""
    task = create_task(client, user, "Path", "one")
    path = user.url(f"/{task['id']}")
    steps: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("PUT", path, {"title": "Path 2"}, "task.updated"),
        ("PUT", path, {"description": None}, "task.updated"),
        # The completion flag alone is a completion, whichever endpoint changes it.
        ("PUT", path, {"completed": True}, "task.completed"),
        ("PUT", path, {"completed": False, "title": "Path 3"}, "task.updated"),
        ("PUT", path, {"completed": True}, "task.completed"),
        ("PATCH", path + "/complete", None, "task.reopened"),  # no body: toggle
        ("PATCH", path + "/complete", {"completed": True}, "task.completed"),
        ("PATCH", path + "/complete", {"completed": False}, "task.reopened"),
        ("DELETE", path, None, "task.deleted"),
    ]
    for method, url, body, _ in steps:
        etag = client.get(path, headers=user.headers).headers["ETag"]
        response = client.request(
            method, url, json=body, headers={**user.headers, "If-Match": etag}
        )
        assert response.status_code in (200, 204), response.text
    actions = [e["action"] for e in events_of(database.engine, user.user_id)]
    assert actions == ["task.created", *(action for *_, action in steps)]
    assert client.get(path, headers=user.headers).status_code == 404


UNAUDITED_WIPES = {
    # CASCADE: task_tags references tasks, and a plain TRUNCATE would stop at that first.
    "truncate tasks": "TRUNCATE tasks CASCADE",
    "delete chain head": "DELETE FROM audit_chain_heads WHERE user_id = :user_id",
    "truncate chain heads": "TRUNCATE audit_chain_heads",
    "truncate task tags": "TRUNCATE task_tags",
    "truncate tags": "TRUNCATE tags CASCADE",
}


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("statement", UNAUDITED_WIPES)
def test_truncating_tasks_or_tags_or_dropping_chain_heads_is_refused(
    client: TestClient, user: Any, database: Database, statement: str, replica: bool
) -> None:
    """A row trigger does not see TRUNCATE, and a lost head would restart a chain at seq 1."""
    task = create_task(client, user, "Kept")
    head = chain_head(database.engine, user.user_id)
    with database.engine.connect() as conn, conn.begin():
        if replica:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        with pytest.raises(sa.exc.DBAPIError) as excinfo:
            conn.execute(sa.text(UNAUDITED_WIPES[statement]), {"user_id": user.user_id})
    assert excinfo.value.orig.pgcode == "42501"  # insufficient_privilege
    assert "is not allowed" in str(excinfo.value.orig)
    assert chain_head(database.engine, user.user_id) == head
    got = client.get(user.url(f"/{task['id']}"), headers=user.headers)
    assert got.status_code == 200


def test_guard_lookup_is_planned_per_call(database: Database) -> None:
    """A cached generic plan from an empty table would make every COMMIT scan the whole log."""
    with database.engine.connect() as conn:
        config = conn.execute(
            sa.text("SELECT proconfig FROM pg_proc WHERE proname = 'tasks_require_audit_event'")
        ).scalar_one()
    assert config == ["plan_cache_mode=force_custom_plan"]


def test_guard_finds_the_event_by_its_task_for_a_user_new_to_the_statistics() -> None:
    """To statistics that have seen one user only, any other user has one event; planned
    with that estimate, the guard's lookup walked all of a new user's events, by
    `(user_id, seq)`, for each task its transaction changed (N tasks: N x N rows). Since
    0013 it goes by the task (`ix_audit_events_entity`). Read from PostgreSQL's index
    counters, in a database of its own: the shared one holds every test's users."""
    from bench.seed import _seed_user

    tasks = 300
    with scratch_database() as url:
        engine = sa.create_engine(url)
        raw = engine.raw_connection()
        try:
            conn = raw.dbapi_connection
            assert conn is not None
            _seed_user(conn, "known", 200)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ANALYZE tasks, audit_events")

            def index_reads() -> dict[str, tuple[int, int]]:
                with conn.cursor() as cur:
                    # Flushed when this backend next goes idle, before it answers.
                    cur.execute("SELECT pg_stat_force_next_flush()")
                    cur.execute(
                        "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes"
                        " WHERE relname = 'audit_events'"
                    )
                    return {name: (scans, reads) for name, scans, reads in cur.fetchall()}

            before = index_reads()
            conn.autocommit = False
            _seed_user(conn, "newcomer", tasks)  # one transaction: the guard checks at COMMIT
            conn.autocommit = True
            after = index_reads()
        finally:
            raw.close()
            engine.dispose()

    def delta(index: str, column: int) -> int:
        return after[index][column] - before[index][column]

    assert delta("ix_audit_events_entity", 0) >= tasks
    assert delta("uq_audit_events_user_seq", 1) < tasks


@pytest.mark.parametrize("seq", [0, -5])
def test_an_event_below_the_start_of_a_chain_is_refused(
    client: TestClient, user: Any, database: Database, seq: int
) -> None:
    """The incremental verify reads on from the last verified seq, so a row below 1 would be
    served by the API yet never verified by it."""
    create_task(client, user, "Chained")
    with pytest.raises(sa.exc.IntegrityError) as excinfo, database.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_events (user_id, seq, occurred_at, actor_id, action, "
                "entity_type, entity_id, changes, xact_id, prev_hash, hash, hash_version) "
                "SELECT user_id, :seq, occurred_at, actor_id, action, entity_type, entity_id, "
                "changes, xact_id, prev_hash, hash, hash_version "
                "FROM audit_events WHERE user_id = :u"
            ),
            {"seq": seq, "u": user.user_id},
        )
    assert excinfo.value.orig.pgcode == "23514"  # check_violation
    assert len(events_of(database.engine, user.user_id)) == 1
