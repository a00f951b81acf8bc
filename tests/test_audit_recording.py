"""Every task change writes exactly one audit event, in the same transaction as the change."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from audit.chain import GENESIS_HASH, HASH_VERSION, compute_hash, format_timestamp
from audit.recorder import AuditContext, record_change
from service.app import create_app
from service.database import Database
from service.exceptions import NotFound
from service.settings import Settings
from service.sqltypes import utcnow
from service.tasks import queries, rules
from service.tasks.models import TaskCreate, TaskUpdate
from tests.audit_helpers import chain_head, change, events_of
from tests.support import create_task

ACTIONS = ("task.created", "task.updated", "task.completed", "task.reopened", "task.deleted")
USER_AGENT = "audit-test/1.0"


class InjectedFailure(Exception):
    """Raised on purpose between the audit insert and the commit."""


def _state(api_task: dict[str, Any]) -> dict[str, Any]:
    """A task from the API as the audit log records it."""
    return {
        "id": api_task["id"],
        "user_id": api_task["user_id"],
        "title": api_task["title"],
        "description": api_task["description"],
        "completed": api_task["completed"],
        "created_at": format_timestamp(datetime.fromisoformat(api_task["created_at"])),
        "updated_at": format_timestamp(datetime.fromisoformat(api_task["updated_at"])),
        "priority": api_task["priority"],
        "due_at": api_task["due_at"],
        "tags": api_task["tags"],
        "recurrence": api_task["recurrence"],
        "previous_task_id": api_task["previous_task_id"],
        "next_task_id": api_task["next_task_id"],
        "remind_at": api_task["remind_at"],
    }


# A task's new fields at their defaults, as a create or delete records them in `changes`.
DEFAULTS = {
    "priority": "none",
    "due_at": None,
    "tags": [],
    "recurrence": None,
    "previous_task_id": None,
    "next_task_id": None,
    "remind_at": None,
}


def _get(client: TestClient, user: Any, task_id: int) -> dict[str, Any]:
    response = client.get(user.url(f"/{task_id}"), headers=user.headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("action", ACTIONS)
def test_each_action_records_exactly_one_event(
    client: TestClient, user: Any, database: Database, action: str
) -> None:
    engine = database.engine
    headers = {**user.headers, "X-Request-ID": f"req-{action}", "User-Agent": USER_AGENT}
    if action == "task.created":
        old_events: list[dict[str, Any]] = []
        response = client.post(
            user.url(), json={"title": "Buy milk", "description": "2 litres"}, headers=headers
        )
        assert response.status_code == 201
        before, after = None, _state(response.json())
        task_id = after["id"]
    else:
        task = create_task(client, user, "Buy milk", "2 litres")
        task_id = task["id"]
        if action == "task.reopened":
            change(client, "PATCH", f"/{task_id}/complete", user, json={"completed": True})
        before = _state(_get(client, user, task_id))
        old_events = events_of(engine, user.user_id)
        path = user.url(f"/{task_id}")
        if action == "task.updated":
            response = client.put(path, json={"title": "Buy oat milk"}, headers=headers)
        elif action == "task.completed":
            response = client.patch(path + "/complete", json={"completed": True}, headers=headers)
        elif action == "task.reopened":
            response = client.patch(path + "/complete", json={"completed": False}, headers=headers)
        else:
            response = client.delete(path, headers=headers)
        assert response.status_code in (200, 204), response.text
        after = _state(response.json()) if action != "task.deleted" else None

    events = events_of(engine, user.user_id)
    assert len(events) == len(old_events) + 1
    event = events[-1]
    assert event["action"] == action
    assert event["before"] == before
    assert event["after"] == after
    expected_changes = {
        "task.created": {
            "title": [None, "Buy milk"],
            "description": [None, "2 litres"],
            "completed": [None, False],
            **{name: [None, value] for name, value in DEFAULTS.items()},
        },
        "task.updated": {"title": ["Buy milk", "Buy oat milk"]},
        "task.completed": {"completed": [False, True]},
        "task.reopened": {"completed": [True, False]},
        "task.deleted": {
            "title": ["Buy milk", None],
            "description": ["2 litres", None],
            "completed": [False, None],
            **{name: [value, None] for name, value in DEFAULTS.items()},
        },
    }[action]
    assert event["changes"] == expected_changes
    assert event["user_id"] == event["actor_id"] == user.user_id
    assert (event["entity_type"], event["entity_id"]) == ("task", str(task_id))
    assert event["request_id"] == f"req-{action}"
    assert event["client_ip"] == "testclient"
    assert event["user_agent"] == USER_AGENT
    assert event["xact_id"] is not None
    # Linked into the chain right after the previous event, and hashed over what is stored.
    previous = old_events[-1] if old_events else None
    assert event["seq"] == (previous["seq"] + 1 if previous else 1)
    assert event["prev_hash"] == (previous["hash"] if previous else GENESIS_HASH)
    assert event["hash_version"] == HASH_VERSION
    assert event["hash"] == compute_hash(event)
    assert chain_head(engine, user.user_id) == (event["seq"], event["hash"])


def _inject(action: str, session: Session, ctx: AuditContext, user_id: str, task_id: int) -> Any:
    """Run one action through the service layer (what the routes call)."""
    calls: dict[str, Callable[[], Any]] = {
        "task.created": lambda: rules.create_task(
            session, ctx, user_id, TaskCreate(title="Never committed")
        ),
        "task.updated": lambda: rules.update_task(
            session, ctx, user_id, task_id, TaskUpdate(title="Never committed")
        ),
        "task.completed": lambda: rules.set_completed(session, ctx, user_id, task_id, True),
        "task.reopened": lambda: rules.set_completed(session, ctx, user_id, task_id, False),
        "task.deleted": lambda: rules.delete_task(session, ctx, user_id, task_id),
    }
    return calls[action]()


@pytest.mark.parametrize("action", ACTIONS)
def test_failure_after_the_audit_insert_leaves_neither_row(
    client: TestClient, user: Any, database: Database, action: str
) -> None:
    engine = database.engine
    task = create_task(client, user, "Keep me")
    if action == "task.reopened":
        change(client, "PATCH", f"/{task['id']}/complete", user, json={"completed": True})
    task_before = _get(client, user, task["id"])
    head_before = chain_head(engine, user.user_id)
    events_before = events_of(engine, user.user_id)
    ctx = AuditContext(actor_id=user.user_id, request_id="injected")

    with pytest.raises(InjectedFailure), database.unit_of_work() as session:
        result = _inject(action, session, ctx, user.user_id, task["id"])
        assert result.event is not None and result.event.action == action
        # The event is written, in the very transaction that changed the task.
        same_xact = session.execute(
            sa.text("SELECT xact_id = txid_current() FROM audit_events WHERE id = :id"),
            {"id": result.event.id},
        ).scalar_one()
        assert same_xact is True
        created_id = result.task.id if action == "task.created" else None
        raise InjectedFailure

    assert events_of(engine, user.user_id) == events_before
    assert chain_head(engine, user.user_id) == head_before
    assert _get(client, user, task["id"]) == task_before
    if created_id is not None:
        with database.unit_of_work() as session, pytest.raises(NotFound):
            queries.get_task(session, user.user_id, created_id)
    # The chain goes on without a gap.
    change(client, "PUT", f"/{task['id']}", user, json={"title": "Next change"})
    assert events_of(engine, user.user_id)[-1]["seq"] == head_before[0] + 1


@pytest.mark.parametrize("write", ["update", "delete", "update_fields"])
def test_a_task_write_with_another_owner_changes_nothing(
    client: TestClient, user: Any, make_user: Any, database: Database, write: str
) -> None:
    """Each write statement names the task's owner as well as its id: `lock_task` checks the
    owner first, but a caller that skipped it, with another user's id and this task's id,
    still finds no row. Nothing changes, and no event is recorded in either user's chain."""
    engine = database.engine
    task = create_task(client, user, "Not yours")
    other = make_user()
    create_task(client, other, "Theirs")  # the other user's chain head
    task_before = _get(client, user, task["id"])
    events_before = [events_of(engine, owner.user_id) for owner in (user, other)]
    values, now = {"title": "Taken"}, utcnow()

    with database.unit_of_work() as session:
        if write == "update_fields":
            with pytest.raises(sa.exc.NoResultFound):
                queries.update_fields(session, other.user_id, task["id"], values, now)
        else:
            audited = (
                queries.update_statement(other.user_id, task["id"], values, now)
                if write == "update"
                else queries.delete_statement(other.user_id, task["id"])
            )
            with pytest.raises(LookupError):
                record_change(
                    session,
                    AuditContext(actor_id=other.user_id),
                    audited.statement,
                    audited.params,
                    user_id=other.user_id,
                    action=f"task.{write}d",
                    entity_type="task",
                    entity_id=str(task["id"]),
                    before=None,
                    after=None,
                    diff_fields=(),
                )

    assert _get(client, user, task["id"]) == task_before
    assert [events_of(engine, owner.user_id) for owner in (user, other)] == events_before


def test_failure_at_commit_leaves_neither_row(
    client: TestClient, user: Any, database: Database
) -> None:
    """The last moment before COMMIT, via the session's before_commit hook."""
    task = create_task(client, user, "Keep me")
    events_before = events_of(database.engine, user.user_id)

    def fail(_session: Session) -> None:
        raise InjectedFailure

    ctx = AuditContext(actor_id=user.user_id)
    with pytest.raises(InjectedFailure), database.unit_of_work() as session:
        sa_event.listen(session, "before_commit", fail)
        rules.update_task(session, ctx, user.user_id, task["id"], TaskUpdate(title="Lost"))
        rules.set_completed(session, ctx, user.user_id, task["id"], True)

    assert events_of(database.engine, user.user_id) == events_before
    assert _get(client, user, task["id"])["title"] == "Keep me"


def test_no_op_updates_record_nothing(client: TestClient, user: Any, database: Database) -> None:
    task = create_task(client, user, "Same", "Same text")
    path = user.url(f"/{task['id']}")
    etag = client.get(path, headers=user.headers).headers["ETag"]
    count = len(events_of(database.engine, user.user_id))

    for body in (
        {"title": "Same"},
        {"title": "  Same  "},  # trimmed to the current title
        {"title": "Same", "description": "Same text", "completed": False},
    ):
        response = client.put(path, json=body, headers=user.headers)
        assert response.status_code == 200
        assert response.json() == task
        assert response.headers["ETag"] == etag
    response = client.patch(path + "/complete", json={"completed": False}, headers=user.headers)
    assert response.status_code == 200
    assert response.json() == task

    assert len(events_of(database.engine, user.user_id)) == count


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("client-req-42", True), ("x" * 129, False), ("caf\u00e9", False), ("", False)],
)
def test_request_id_is_returned_and_stored(
    client: TestClient, user: Any, database: Database, sent: str, kept: bool
) -> None:
    response = client.post(
        user.url(),
        json={"title": "Traced"},
        headers={**user.headers, "X-Request-ID": sent.encode("latin-1")},
    )
    assert response.status_code == 201
    returned = response.headers["X-Request-ID"]
    if kept:
        assert returned == sent
    else:
        assert returned != sent and len(returned) == 32
    assert events_of(database.engine, user.user_id)[-1]["request_id"] == returned


def test_long_user_agent_is_truncated(client: TestClient, user: Any, database: Database) -> None:
    agent = "A" * 300 + "B" * 700
    response = client.post(
        user.url(), json={"title": "UA"}, headers={**user.headers, "User-Agent": agent}
    )
    assert response.status_code == 201
    assert events_of(database.engine, user.user_id)[-1]["user_agent"] == agent[:256]


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [("Zoë's browser 🦊".encode(), "Zoë's browser 🦊"), (b"old \xe9 agent", "old \xe9 agent")],
)
def test_user_agent_is_recorded_as_the_client_wrote_it(
    client: TestClient, user: Any, database: Database, sent: bytes, recorded: str
) -> None:
    """UTF-8 as UTF-8, and bytes that are not UTF-8 as Latin-1."""
    response = client.post(
        user.url(), json={"title": "UA"}, headers={**user.headers, "User-Agent": sent}
    )
    assert response.status_code == 201
    assert events_of(database.engine, user.user_id)[-1]["user_agent"] == recorded


def test_forwarded_for_is_ignored_without_trusted_proxies(
    client: TestClient, user: Any, database: Database
) -> None:
    headers = {**user.headers, "X-Forwarded-For": "203.0.113.7"}
    assert client.post(user.url(), json={"title": "IP"}, headers=headers).status_code == 201
    assert events_of(database.engine, user.user_id)[-1]["client_ip"] == "testclient"


def test_forwarded_for_is_used_behind_a_trusted_proxy(
    settings: Settings, database: Database, user: Any
) -> None:
    trusted = settings.model_copy(update={"trusted_proxies": ["testclient"]})
    with TestClient(create_app(trusted, database)) as client:
        headers = {**user.headers, "X-Forwarded-For": "198.51.100.9, 203.0.113.7, testclient"}
        assert client.post(user.url(), json={"title": "IP"}, headers=headers).status_code == 201
    # The nearest address that is not a trusted proxy is the client.
    assert events_of(database.engine, user.user_id)[-1]["client_ip"] == "203.0.113.7"


@pytest.mark.parametrize(
    ("forwarded", "recorded"),
    [
        ("<script>", "testclient"),
        ("unknown", "testclient"),
        ("203.0.113.7" * 10, "testclient"),  # longer than the column's 64 characters
        ("fe80::1%<script>", "testclient"),  # an IPv6 zone is any text to `ipaddress`
        ("203.0.113.7:4431", "203.0.113.7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
    ],
    ids=["markup", "unknown", "over-long", "ipv6-zone", "ipv4-port", "ipv6-port"],
)
def test_a_forwarded_client_that_is_not_an_ip_address_is_the_proxy(
    settings: Settings, database: Database, user: Any, forwarded: str, recorded: str
) -> None:
    """uvicorn takes whatever text the trusted proxy forwards as the client's host: it would
    be the audit log's `client_ip` and the rate limiter's key. Text that is not an address
    stands for the proxy's own (TestClient's `testclient`), the nearest address known."""
    trusted = settings.model_copy(update={"trusted_proxies": ["testclient"]})
    with TestClient(create_app(trusted, database)) as client:
        headers = {**user.headers, "X-Forwarded-For": forwarded}
        answer = client.post(user.url(), json={"title": "IP"}, headers=headers)
        assert answer.status_code == 201, answer.text
    assert events_of(database.engine, user.user_id)[-1]["client_ip"] == recorded
