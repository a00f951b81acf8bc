"""Reminders over real HTTP on PostgreSQL: `remind_at` validation, one `reminder.fired` event
per task and time (in the chain, the feed and the reminders list), re-arming, cancelling, late
firing after downtime, and recurrence. Several instances: tests/test_reminder_instances.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import Database
from service.settings import Settings
from tests.audit_helpers import json_lines, run_cli
from tests.feed_helpers import FeedReader
from tests.reminder_helpers import at, fired_events, reminders, verify, wait_fired
from tests.support import ApiUser, LiveServer, assert_validation_error, create_task, link_url

POLL = 0.1


@pytest.fixture
def serve(settings: Settings, database: Database) -> Callable[..., Any]:
    """Serve the app, reminder workers on, over a real socket (several may run at once)."""

    @contextmanager
    def run(**changes: Any) -> Iterator[LiveServer]:
        update = {"reminders_enabled": True, "reminder_poll_seconds": POLL, **changes}
        with LiveServer(create_app(settings.model_copy(update=update), database)) as server:
            yield server

    return run


@pytest.fixture
def http(serve: Callable[..., Any]) -> Iterator[httpx.Client]:
    with serve() as server, server.client() as client:
        yield client


def settle() -> None:
    """Long enough for several polls: what has not fired by then would have fired twice."""
    time.sleep(POLL * 8)


# Validation ----------------------------------------------------------------------------


def test_remind_at_is_a_task_field_with_an_offset_not_after_due_at(
    http: httpx.Client, user: ApiUser
) -> None:
    due = "2031-05-01T12:00:00+02:00"
    task = create_task(http, user, due_at=due, remind_at="2031-05-01T11:00:00+02:00")
    assert task["remind_at"] == "2031-05-01T09:00:00Z"
    got = http.get(user.url(f"/{task['id']}"), headers=user.headers).json()
    assert got["remind_at"] == "2031-05-01T09:00:00Z"
    # Without a due date any time will do; at the due time itself is fine.
    assert create_task(http, user, remind_at="2031-01-01T00:00:00Z")["remind_at"]
    assert create_task(http, user, due_at=due, remind_at=due)["remind_at"] == "2031-05-01T10:00:00Z"

    after_due = {"title": "t", "due_at": due, "remind_at": "2031-05-01T12:00:01+02:00"}
    resp = http.post(user.url(), json=after_due, headers=user.headers)
    error = assert_validation_error(resp, "body.remind_at")
    assert "remind_at must not be after due_at" in str(error)
    for naive in ("2031-05-01T11:00:00", "2031-05-01", 1_900_000_000, "tomorrow"):
        resp = http.post(user.url(), json={"title": "t", "remind_at": naive}, headers=user.headers)
        assert_validation_error(resp, "body.remind_at")

    url = user.url(f"/{task['id']}")
    # An update is checked against the task as it would be: either field may break the rule.
    resp = http.put(url, json={"remind_at": "2031-05-01T10:00:01Z"}, headers=user.headers)
    assert_validation_error(resp, "body.remind_at")
    resp = http.put(url, json={"due_at": "2031-05-01T08:59:59Z"}, headers=user.headers)
    assert_validation_error(resp, "body.remind_at")
    resp = http.put(url, json={"remind_at": "2031-05-01T11:00:00"}, headers=user.headers)
    assert_validation_error(resp, "body.remind_at")
    unchanged = http.get(url, headers=user.headers).json()
    assert (unchanged["remind_at"], unchanged["due_at"]) == (
        "2031-05-01T09:00:00Z",
        "2031-05-01T10:00:00Z",
    )
    # null clears it; clearing due_at then leaves the reminder alone.
    resp = http.put(url, json={"remind_at": None}, headers=user.headers)
    assert resp.status_code == 200 and resp.json()["remind_at"] is None
    resp = http.put(url, json={"remind_at": "2031-05-01T09:30:00Z"}, headers=user.headers)
    assert resp.json()["remind_at"] == "2031-05-01T09:30:00Z"
    resp = http.put(url, json={"due_at": None}, headers=user.headers)
    assert resp.status_code == 200 and resp.json()["remind_at"] == "2031-05-01T09:30:00Z"
    history = http.get(f"{url}/history", headers=user.headers).json()["items"]
    assert history[-2]["changes"] == {"remind_at": [None, "2031-05-01T09:30:00.000000Z"]}
    assert history[-1]["after"]["remind_at"] == "2031-05-01T09:30:00.000000Z"


# Firing --------------------------------------------------------------------------------


def test_a_due_reminder_fires_once_as_an_audit_event_of_the_service_on_the_feed(
    http: httpx.Client, user: ApiUser, settings: Settings
) -> None:
    task = create_task(http, user, title="Call the dentist", remind_at=at(1.0))
    before = http.get(user.url(f"/{task['id']}"), headers=user.headers)
    with FeedReader(
        str(http.base_url), f"/api/{user.user_id}/events", headers=user.headers
    ) as feed:
        feed.wait_for_seq(2, timeout=30)
        (fired,) = [e for e in feed.task_events if e.seq == 2]
    assert fired.event == "reminder.fired"
    event = fired.json()
    assert event["action"] == "reminder.fired"
    assert event["actor_id"] == settings.reminder_actor_id == "system:reminders"
    assert (event["user_id"], event["entity_type"], event["entity_id"]) == (
        user.user_id,
        "task",
        str(task["id"]),
    )
    remind_at = event["before"]["remind_at"]
    assert _utc(remind_at) == _utc(task["remind_at"])
    # The task did not change: `after` is `before` plus which time fired.
    reminder = {"remind_at": remind_at, "late": False}
    assert event["after"] == {**event["before"], "reminder": reminder}
    assert event["changes"] == {"reminder": [None, reminder]}
    assert event["request_id"] is None and event["client_ip"] is None

    settle()
    assert [e["seq"] for e in fired_events(http, user, task["id"])] == [2]
    # Not an edit: the task, its updated_at and its ETag are as they were.
    after = http.get(user.url(f"/{task['id']}"), headers=user.headers)
    assert after.json() == before.json()
    assert after.headers["ETag"] == before.headers["ETag"]
    resp = http.put(
        user.url(f"/{task['id']}"),
        json={"title": "Call the dentist today"},
        headers={**user.headers, "If-Match": before.headers["ETag"]},
    )
    assert resp.status_code == 200
    history = http.get(user.url(f"/{task['id']}/history"), headers=user.headers).json()
    assert [e["action"] for e in history["items"]] == [
        "task.created",
        "reminder.fired",
        "task.updated",
    ]
    report = verify(http, user)
    assert (report["ok"], report["head_seq"]) == (True, 3)
    # The operators' tools read it like any other event.
    status, out, err = run_cli(settings, "audit", "verify", "--user", user.user_id)
    assert status == 0, out + err
    status, out, err = run_cli(
        settings, "audit", "export", "--user", user.user_id, "--format", "ndjson"
    )
    assert status == 0, err
    exported = [e for e in json_lines(out) if e.get("action") == "reminder.fired"]
    assert [(e["seq"], e["actor_id"], e["changes"]) for e in exported] == [
        (2, "system:reminders", {"reminder": [None, reminder]})
    ]
    # The task as of the firing is the task (the reminder is not a task field).
    as_of = http.get(
        user.url(f"/{task['id']}/history"),
        params={"as_of": event["occurred_at"]},
        headers=user.headers,
    )
    assert as_of.status_code == 200 and as_of.json()["event_seq"] == 2
    assert as_of.json()["task"]["title"] == "Call the dentist"


def test_changing_remind_at_re_arms_the_reminder(http: httpx.Client, user: ApiUser) -> None:
    task = create_task(http, user, remind_at=at(3600))
    url = user.url(f"/{task['id']}")
    # Moved earlier before it fired: it fires at the new time.
    assert http.put(url, json={"remind_at": at(0.5)}, headers=user.headers).status_code == 200
    first = wait_fired(http, user, task["id"])
    # The same time again is no change, and fires nothing.
    same = http.put(url, json={"remind_at": task["remind_at"]}, headers=user.headers)
    assert same.status_code == 200
    settle()
    assert len(fired_events(http, user, task["id"])) == 1
    # A new time arms it again.
    assert http.put(url, json={"remind_at": at(0.5)}, headers=user.headers).status_code == 200
    events = wait_fired(http, user, task["id"], count=2)
    settle()
    events = fired_events(http, user, task["id"])
    assert len(events) == 2
    assert events[0]["seq"] == first[0]["seq"]
    times = [e["after"]["reminder"]["remind_at"] for e in events]
    assert times[0] != times[1]
    assert times[1] == events[1]["after"]["remind_at"]
    assert verify(http, user)["ok"] is True


def test_setting_remind_at_back_to_a_time_that_fired_arms_it_again(
    http: httpx.Client, user: ApiUser
) -> None:
    """Any change of `remind_at` arms it, whatever fired before: a reminder moved later and
    then back, or cleared and set again, to the time that fired is set in the past, and a
    time set in the past fires at once."""
    task = create_task(http, user, remind_at=at(0.3))
    url = user.url(f"/{task['id']}")
    wait_fired(http, user, task["id"])
    assert http.put(url, json={"remind_at": at(3600)}, headers=user.headers).status_code == 200
    assert [r["state"] for r in reminders(http, user)] == ["pending"]
    assert (
        http.put(url, json={"remind_at": task["remind_at"]}, headers=user.headers).status_code
        == 200
    )
    wait_fired(http, user, task["id"], count=2, timeout=5)
    assert [r["state"] for r in reminders(http, user)] == ["fired"]
    for change in (None, task["remind_at"]):
        resp = http.put(url, json={"remind_at": change}, headers=user.headers)
        assert resp.status_code == 200
    wait_fired(http, user, task["id"], count=3, timeout=5)
    settle()
    events = fired_events(http, user, task["id"])
    assert [e["after"]["reminder"]["remind_at"] for e in events] == [
        events[0]["after"]["remind_at"]
    ] * 3
    assert verify(http, user)["ok"] is True


def test_completing_or_deleting_the_task_cancels_its_reminder(
    http: httpx.Client, user: ApiUser
) -> None:
    due = at(1.5)
    completed = create_task(http, user, title="completed", remind_at=due)
    deleted = create_task(http, user, title="deleted", remind_at=due)
    cleared = create_task(http, user, title="cleared", remind_at=due)
    control = create_task(http, user, title="control", remind_at=due)
    resp = http.patch(user.url(f"/{completed['id']}/complete"), headers=user.headers)
    assert resp.status_code == 200 and resp.json()["completed"] is True
    assert http.delete(user.url(f"/{deleted['id']}"), headers=user.headers).status_code == 204
    resp = http.put(user.url(f"/{cleared['id']}"), json={"remind_at": None}, headers=user.headers)
    assert resp.status_code == 200
    wait_fired(http, user, control["id"])
    settle()
    assert [e["entity_id"] for e in fired_events(http, user)] == [str(control["id"])]
    # A cancelled reminder is neither pending nor fired.
    assert [r["task_id"] for r in reminders(http, user)] == [control["id"]]
    # Reopening the task arms its reminder again (it has not fired): it fires once, now.
    resp = http.patch(
        user.url(f"/{completed['id']}/complete"), json={"completed": False}, headers=user.headers
    )
    assert resp.status_code == 200
    wait_fired(http, user, completed["id"])
    settle()
    assert sorted(e["entity_id"] for e in fired_events(http, user)) == sorted(
        [str(control["id"]), str(completed["id"])]
    )
    assert verify(http, user)["ok"] is True


def test_a_reminder_missed_while_the_service_was_down_fires_once_marked_late(
    client: TestClient, serve: Callable[..., Any], user: ApiUser
) -> None:
    # Written while no reminder worker runs (`client` has them off): the service is "down".
    long_ago = create_task(client, user, title="long ago", remind_at=at(-2 * 3600))
    just_now = create_task(client, user, title="just now", remind_at=at(-1))
    assert fired_events(client, user) == []
    pending = reminders(client, user, state="pending")
    assert [r["task_id"] for r in pending] == [long_ago["id"], just_now["id"]]
    assert all(r["fired_at"] is None and r["late"] is False for r in pending)

    with serve(reminder_grace_seconds=60) as server, server.client() as http:
        wait_fired(http, user, long_ago["id"])
        wait_fired(http, user, just_now["id"])
        settle()
    events = {e["entity_id"]: e for e in fired_events(client, user)}
    assert set(events) == {str(long_ago["id"]), str(just_now["id"])}
    assert events[str(long_ago["id"])]["after"]["reminder"]["late"] is True
    assert events[str(just_now["id"])]["after"]["reminder"]["late"] is False
    fired = {r["task_id"]: r for r in reminders(client, user, state="fired")}
    assert (fired[long_ago["id"]]["late"], fired[just_now["id"]]["late"]) == (True, False)
    # Started again: nothing fires twice.
    with serve(reminder_grace_seconds=60):
        settle()
    assert len(fired_events(client, user)) == 2


# The list ------------------------------------------------------------------------------


def test_the_reminders_list_by_state_for_its_user_only(
    http: httpx.Client, make_user: Callable[..., ApiUser]
) -> None:
    alice, bob = make_user(), make_user()
    soon = create_task(http, alice, title="soon", remind_at=at(0.3), due_at=at(7200))
    later = create_task(http, alice, title="later", remind_at=at(3600))
    create_task(http, alice, title="no reminder")
    bobs = create_task(http, bob, title="bob's", remind_at=at(3600))
    wait_fired(http, alice, soon["id"])

    pending = reminders(http, alice, state="pending")
    assert [(r["task_id"], r["state"]) for r in pending] == [(later["id"], "pending")]
    assert pending[0] == {
        "task_id": later["id"],
        "title": "later",
        "remind_at": later["remind_at"],
        "due_at": None,
        "state": "pending",
        "fired_at": None,
        "late": False,
    }
    (fired,) = reminders(http, alice, state="fired")
    assert (fired["task_id"], fired["title"], fired["state"], fired["late"]) == (
        soon["id"],
        "soon",
        "fired",
        False,
    )
    assert fired["remind_at"] == soon["remind_at"] and fired["due_at"] == soon["due_at"]
    fired_at = datetime.fromisoformat(fired["fired_at"])
    assert timedelta(0) <= fired_at - datetime.fromisoformat(soon["remind_at"]) < timedelta(60)
    # Both states, by time; another user's reminders never show.
    assert [r["task_id"] for r in reminders(http, alice)] == [soon["id"], later["id"]]
    assert [r["task_id"] for r in reminders(http, bob)] == [bobs["id"]]
    resp = http.get(f"/api/{bob.user_id}/reminders", headers=alice.headers)
    assert resp.status_code == 403
    assert http.get(f"/api/{alice.user_id}/reminders").status_code == 401
    # Bounded, paged input.
    page = http.get(f"/api/{alice.user_id}/reminders", params={"limit": 1}, headers=alice.headers)
    assert [r["task_id"] for r in page.json()] == [soon["id"]]
    next_url = link_url(page, "next")
    assert next_url is not None and "after=" in next_url
    last = http.get(next_url, headers=alice.headers)
    assert [r["task_id"] for r in last.json()] == [later["id"]] and "Link" not in last.headers
    by_offset = http.get(
        f"/api/{alice.user_id}/reminders", params={"limit": 1, "offset": 1}, headers=alice.headers
    )
    assert by_offset.json() == last.json()
    for bad in ({"state": "cancelled"}, {"limit": 0}, {"limit": 501}, {"offset": -1}):
        resp = http.get(f"/api/{alice.user_id}/reminders", params=bad, headers=alice.headers)
        assert_validation_error(resp)


def test_paging_pending_reminders_skips_none_when_one_leaves_the_list(
    http: httpx.Client, user: ApiUser
) -> None:
    """The first page's reminder is cancelled (its task completed) before the next page is
    read: the link continues after it, where an offset would have skipped the second one."""
    ids = [create_task(http, user, f"r{n}", remind_at=at(3600 * (n + 1)))["id"] for n in range(3)]
    url = f"/api/{user.user_id}/reminders"
    page = http.get(url, params={"state": "pending", "limit": 1}, headers=user.headers)
    assert [r["task_id"] for r in page.json()] == ids[:1]
    http.patch(user.url(f"/{ids[0]}/complete"), headers=user.headers)
    seen: list[int] = []
    next_url = link_url(page, "next")
    while next_url:
        page = http.get(next_url, headers=user.headers)
        seen += [r["task_id"] for r in page.json()]
        next_url = link_url(page, "next")
    assert seen == ids[1:]
    # The cursor is base64url JSON; one edited to a time past year 9999 once in UTC, too.
    past_9999 = base64.urlsafe_b64encode(
        json.dumps(["reminders", "9999-12-31T23:59:59-23:59", 1]).encode()
    ).decode()
    for bad in ({"after": "nope"}, {"after": "nope", "offset": 1}, {"after": past_9999}):
        assert_validation_error(http.get(url, params=bad, headers=user.headers), "query.after")


# Recurrence ----------------------------------------------------------------------------


def test_the_next_occurrence_keeps_the_reminder_as_far_before_its_due_date(
    http: httpx.Client, user: ApiUser
) -> None:
    task = create_task(
        http,
        user,
        due_at="2031-03-10T09:00:00Z",
        remind_at="2031-03-09T18:30:00Z",
        recurrence="FREQ=WEEKLY",
    )
    resp = http.patch(user.url(f"/{task['id']}/complete"), headers=user.headers)
    next_id = resp.json()["next_task_id"]
    following = http.get(user.url(f"/{next_id}"), headers=user.headers).json()
    assert following["due_at"] == "2031-03-17T09:00:00Z"
    assert following["remind_at"] == "2031-03-16T18:30:00Z"
    history = http.get(user.url(f"/{next_id}/history"), headers=user.headers).json()["items"]
    assert history[0]["after"]["remind_at"] == "2031-03-16T18:30:00.000000Z"
    # Without a reminder, the next one has none.
    plain = create_task(http, user, due_at="2031-03-10T09:00:00Z", recurrence="FREQ=DAILY")
    resp = http.patch(user.url(f"/{plain['id']}/complete"), headers=user.headers)
    following = http.get(user.url(f"/{resp.json()['next_task_id']}"), headers=user.headers)
    assert following.json()["remind_at"] is None


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# Settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"REMINDER_ACTOR_ID": ""},
        {"REMINDER_ACTOR_ID": "system\nreminders"},
        {"REMINDER_ACTOR_ID": "system\x85reminders"},
        {"REMINDER_ACTOR_ID": "x" * 129},
        {"REMINDER_BATCH_SIZE": "0"},
        {"REMINDER_BATCH_SIZE": "501"},
        {"REMINDER_POLL_SECONDS": "0"},
        {"REMINDER_GRACE_SECONDS": "-1"},
    ],
)
def test_reminder_settings_are_bounded(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_reminder_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    monkeypatch.setenv("REMINDERS_ENABLED", "false")
    monkeypatch.setenv("REMINDER_ACTOR_ID", "service:todo-reminders")
    monkeypatch.setenv("REMINDER_GRACE_SECONDS", "60")
    loaded = Settings(_env_file=None)  # type: ignore[call-arg]
    assert loaded.reminders_enabled is False
    assert (loaded.reminder_actor_id, loaded.reminder_grace_seconds) == (
        "service:todo-reminders",
        60,
    )
    assert (loaded.reminder_poll_seconds, loaded.reminder_batch_size) == (5, 20)
