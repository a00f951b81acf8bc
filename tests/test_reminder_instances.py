"""Reminders with several `todo-api serve` processes against one database: a batch of due
reminders fires exactly once in total, every feed gets every change of its user (reminders
included) whichever instance wrote it, and a worker killed before its commit loses nothing."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.database import Database
from service.reminders.firing import fire_due
from service.settings import Settings
from tests.feed_helpers import FeedReader
from tests.instances import Instance
from tests.reliability_helpers import lock_waiter, wait_until
from tests.reminder_helpers import at, fired_events, verify, wait_fired
from tests.support import ApiUser, create_task

FAST = {"reminder_poll_seconds": 0.1, "reminder_batch_size": 10}


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://"))
    yield engine
    engine.dispose()


def fired_counts(engine: sa.Engine, user_ids: list[str]) -> Counter[tuple[str, str]]:
    """reminder.fired events per (user, task), straight from the table."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT user_id, entity_id FROM audit_events "
                "WHERE action = 'reminder.fired' AND user_id = ANY(:users)"
            ),
            {"users": user_ids},
        )
        return Counter((r.user_id, r.entity_id) for r in rows)


def fired_by(instance: Instance) -> int:
    """How many reminders this instance's log says it fired."""
    total = 0
    for line in instance.output().splitlines():
        if line.startswith("{") and '"reminders fired"' in line:
            total += json.loads(line)["fired"]
    return total


def test_two_instances_fire_200_due_reminders_exactly_once_and_every_feed_sees_them(
    database_url: str, client: TestClient, make_user: Callable[..., ApiUser], engine: sa.Engine
) -> None:
    users = [make_user() for _ in range(4)]
    # 200 reminders due by the time the instances start (written with no worker running).
    due = {
        user.user_id: [
            create_task(client, user, title=f"r{n}", remind_at=at(1))["id"] for n in range(50)
        ]
        for user in users
    }
    instances = [Instance(database_url, **FAST), Instance(database_url, **FAST)]
    try:
        for instance in instances:
            instance.wait_ready()
        a, b = instances
        feeds = [
            FeedReader(i.url, f"/api/{u.user_id}/events", headers=dict(u.headers))
            for u in users
            for i in instances
        ]
        for feed in feeds:
            feed.__enter__()
        # More writes through both instances, with reminders due during the test.
        with a.client() as http_a, b.client() as http_b:
            clients = itertools.cycle([http_a, http_b])
            for user in users:
                for n in range(3):
                    due[user.user_id].append(
                        create_task(next(clients), user, title=f"w{n}", remind_at=at(0.5))["id"]
                    )
            expected = {(u, str(t)) for u, ids in due.items() for t in ids}
            wait_until(
                lambda: set(fired_counts(engine, list(due))) == expected,
                "every reminder to fire",
                timeout=120,
            )
            # Many more polls of both instances: nothing fires twice.
            time.sleep(1.5)
            counts = fired_counts(engine, list(due))
            assert set(counts) == expected and set(counts.values()) == {1}, counts.most_common(3)
            assert len(expected) == 212
            # (Other tests' due reminders in this database may be among what they fired.)
            assert fired_by(a) + fired_by(b) >= 212
            print(f"fired by instance a: {fired_by(a)}, by instance b: {fired_by(b)}")
            for user in users:
                head = 2 * 53  # 53 task.created and 53 reminder.fired
                for feed in feeds:
                    if feed.path == f"/api/{user.user_id}/events":
                        feed.wait_for_seq(head, timeout=60)
                        assert feed.seqs == list(range(1, head + 1))
                        actions = Counter(e.event for e in feed.task_events)
                        assert actions == {"task.created": 53, "reminder.fired": 53}
                        fired_tasks = [
                            e.json()["entity_id"]
                            for e in feed.task_events
                            if e.event == "reminder.fired"
                        ]
                        assert sorted(fired_tasks) == sorted(str(t) for t in due[user.user_id])
                http = next(clients)
                report = verify(http, user)
                assert (report["ok"], report["head_seq"]) == (True, head)
        for feed in feeds:
            feed.close()
        for instance in instances:
            assert instance.terminate(timeout=30) in (0, -15), instance.output()[-2000:]
    finally:
        for instance in instances:
            instance.stop()


def test_a_reminder_claimed_by_a_worker_killed_before_its_commit_fires_once_later(
    database_url: str, client: TestClient, user: ApiUser, engine: sa.Engine
) -> None:
    task = create_task(client, user, title="survives a crash", remind_at=at(1.5))
    doomed = Instance(database_url, db_statement_timeout_ms=0, **FAST)
    survivor: Instance | None = None
    holder = engine.connect()
    try:
        # Hold back every append (a SHARE lock on audit_events): the worker claims the task and
        # its user's chain head (their row locks), then waits here to append the event, inside
        # its transaction. (A held chain head would make it skip the task instead.)
        holder.execute(sa.text("LOCK TABLE audit_events IN SHARE MODE"))
        doomed.wait_ready()
        waiting = wait_until(
            lambda: lock_waiter(engine, "%audit_chain_heads%"),
            "the worker to claim the reminder and wait for the chain head",
            timeout=60,
        )
        assert _locked_by_someone(engine, task["id"])
        # Really kill it: no shutdown, no rollback sent, its transaction left open.
        doomed.process.kill()
        doomed.process.wait(timeout=30)
        # Its backend learns of the dead client when it next talks to it, and rolls back.
        holder.rollback()
        wait_until(
            lambda: not _backend_alive(engine, waiting), "the dead worker's backend to end", 60
        )
        assert fired_events(client, user, task["id"]) == []
        assert not _locked_by_someone(engine, task["id"])

        survivor = Instance(database_url, **FAST)
        survivor.wait_ready()
        with survivor.client() as http:
            (event,) = wait_fired(http, user, task["id"])
            time.sleep(1.5)
            assert [e["seq"] for e in fired_events(http, user, task["id"])] == [event["seq"]]
            report = verify(http, user)
            assert (report["ok"], report["head_seq"]) == (True, 2)
    finally:
        holder.close()
        doomed.stop()
        if survivor is not None:
            survivor.stop()


def test_a_user_in_the_middle_of_a_write_holds_up_no_other_users_reminders(
    client: TestClient,
    make_user: Callable[..., ApiUser],
    database: Database,
    settings: Settings,
    engine: sa.Engine,
) -> None:
    busy, other = make_user(), make_user()
    busy_task = create_task(client, busy, title="its user is busy", remind_at=at(-1))
    other_task = create_task(client, other, title="its user is not", remind_at=at(-1))
    # A slow write of `busy` (a tag renamed on thousands of tasks) holds its chain head.
    holder = engine.connect()
    holder.execute(
        sa.text("SELECT 1 FROM audit_chain_heads WHERE user_id = :u FOR UPDATE"),
        {"u": busy.user_id},
    )

    def fire_all() -> None:
        while fire_due(database, settings) == settings.reminder_batch_size:
            pass

    worker = threading.Thread(target=fire_all, daemon=True)
    try:
        worker.start()
        wait_until(
            lambda: not worker.is_alive() or lock_waiter(engine, "%audit_chain_heads%"),
            "the batches to commit, or one of them to wait for the busy user's chain head",
            timeout=60,
        )
        assert not worker.is_alive(), "a batch waited for the busy user's write"
        assert len(fired_events(client, other, other_task["id"])) == 1
        assert fired_events(client, busy, busy_task["id"]) == []
    finally:
        holder.rollback()
        holder.close()
        worker.join(timeout=60)
    # The write over, the next poll fires it.
    fire_all()
    assert len(fired_events(client, busy, busy_task["id"])) == 1
    for user in (busy, other):
        assert verify(client, user)["ok"] is True


def _backend_alive(engine: sa.Engine, pid: int) -> bool:
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        ).first()
    return found is not None


def _locked_by_someone(engine: sa.Engine, task_id: int) -> bool:
    with engine.connect() as conn:
        mine = conn.execute(
            sa.text("SELECT id FROM tasks WHERE id = :id FOR UPDATE SKIP LOCKED"), {"id": task_id}
        ).first()
        conn.rollback()
    return mine is None
