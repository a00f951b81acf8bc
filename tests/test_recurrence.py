"""Recurring tasks over HTTP: the next occurrence for each supported FREQ (month ends and
leap days included), COUNT/UNTIL exhaustion, the audit trail of a series, and exactly one
next occurrence under concurrent and repeated completions."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import httpx
import pytest
from dateutil.rrule import rrulestr
from fastapi.testclient import TestClient

from audit.chain import HASH_VERSION
from service.database import Database
from service.tasks import recurrence
from tests.audit_helpers import events_of
from tests.support import ApiUser, LiveServer, assert_validation_error
from tests.support import create_task as create


def complete(client: Any, user: ApiUser, task_id: int, via: str = "patch") -> httpx.Response:
    if via == "patch":
        resp = client.patch(
            user.url(f"/{task_id}/complete"), json={"completed": True}, headers=user.headers
        )
    else:
        resp = client.put(user.url(f"/{task_id}"), json={"completed": True}, headers=user.headers)
    assert resp.status_code == 200, resp.text
    return resp  # type: ignore[no-any-return]


def series(client: TestClient, user: ApiUser, due: str, rule: str, steps: int) -> list[str]:
    """Complete `steps` times, following next_task_id; the due dates seen (ends early when the
    rule is exhausted)."""
    task = create(client, user, "Series", due_at=due, recurrence=rule)
    dues = [task["due_at"]]
    for _ in range(steps):
        done = complete(client, user, task["id"]).json()
        if done["next_task_id"] is None:
            break
        task = client.get(user.url(f"/{done['next_task_id']}"), headers=user.headers).json()
        dues.append(task["due_at"])
    return dues


@pytest.mark.parametrize(
    ("due", "rule", "dues"),
    [
        (
            "2026-12-30T09:00:00Z",
            "FREQ=DAILY",
            ["2026-12-30T09:00:00Z", "2026-12-31T09:00:00Z", "2027-01-01T09:00:00Z"],
        ),
        (
            "2026-12-01T09:00:00Z",
            "FREQ=DAILY;INTERVAL=10",
            ["2026-12-01T09:00:00Z", "2026-12-11T09:00:00Z", "2026-12-21T09:00:00Z"],
        ),
        (  # Monday 7 Dec 2026: then Wednesday, then Monday two weeks on
            "2026-12-07T08:00:00Z",
            "FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,WE",
            ["2026-12-07T08:00:00Z", "2026-12-09T08:00:00Z", "2026-12-21T08:00:00Z"],
        ),
        (
            "2026-12-04T17:00:00Z",
            "FREQ=WEEKLY",
            ["2026-12-04T17:00:00Z", "2026-12-11T17:00:00Z", "2026-12-18T17:00:00Z"],
        ),
        (  # the last day of each month
            "2027-01-31T12:00:00Z",
            "FREQ=MONTHLY;BYMONTHDAY=-1",
            [
                "2027-01-31T12:00:00Z",
                "2027-02-28T12:00:00Z",
                "2027-03-31T12:00:00Z",
                "2027-04-30T12:00:00Z",
            ],
        ),
        (  # the 31st: months without one are skipped (RFC 5545)
            "2027-01-31T12:00:00Z",
            "FREQ=MONTHLY;BYMONTHDAY=31",
            ["2027-01-31T12:00:00Z", "2027-03-31T12:00:00Z", "2027-05-31T12:00:00Z"],
        ),
        (  # without BYMONTHDAY, the due date's day: the same skipping
            "2027-01-30T12:00:00Z",
            "FREQ=MONTHLY",
            ["2027-01-30T12:00:00Z", "2027-03-30T12:00:00Z", "2027-04-30T12:00:00Z"],
        ),
        (
            "2027-01-15T12:00:00Z",
            "FREQ=MONTHLY;BYMONTHDAY=1,15",
            ["2027-01-15T12:00:00Z", "2027-02-01T12:00:00Z", "2027-02-15T12:00:00Z"],
        ),
        (
            "2026-12-25T00:00:00Z",
            "FREQ=YEARLY",
            ["2026-12-25T00:00:00Z", "2027-12-25T00:00:00Z", "2028-12-25T00:00:00Z"],
        ),
        (  # 29 February: only leap years
            "2028-02-29T10:00:00Z",
            "FREQ=YEARLY",
            ["2028-02-29T10:00:00Z", "2032-02-29T10:00:00Z", "2036-02-29T10:00:00Z"],
        ),
    ],
)
def test_next_occurrence_for_each_frequency(
    client: TestClient, user: ApiUser, due: str, rule: str, dues: list[str]
) -> None:
    assert series(client, user, due, rule, len(dues) - 1) == dues


def test_count_is_exhausted(client: TestClient, user: ApiUser) -> None:
    dues = series(client, user, "2027-01-31T12:00:00Z", "FREQ=MONTHLY;BYMONTHDAY=-1;COUNT=3", 10)
    assert dues == ["2027-01-31T12:00:00Z", "2027-02-28T12:00:00Z", "2027-03-31T12:00:00Z"]


def test_count_counts_down_on_each_occurrence(client: TestClient, user: ApiUser) -> None:
    task = create(client, user, "C", due_at="2027-01-01T00:00:00Z", recurrence="FREQ=DAILY;COUNT=2")
    done = complete(client, user, task["id"]).json()
    following = client.get(user.url(f"/{done['next_task_id']}"), headers=user.headers).json()
    assert following["recurrence"] == "FREQ=DAILY;COUNT=1"
    last = complete(client, user, following["id"]).json()
    assert last["next_task_id"] is None and last["completed"] is True


def test_until_is_exhausted(client: TestClient, user: ApiUser) -> None:
    dues = series(client, user, "2027-01-01T09:00:00Z", "FREQ=WEEKLY;UNTIL=20270115T090000Z", 10)
    assert dues == ["2027-01-01T09:00:00Z", "2027-01-08T09:00:00Z", "2027-01-15T09:00:00Z"]


def test_the_due_time_s_fraction_of_a_second_is_kept_by_every_occurrence(
    client: TestClient, user: ApiUser
) -> None:
    """A due time read from a clock (`new Date()` plus an hour) has milliseconds: the series
    keeps them, so its occurrences are the rule's interval apart, as is each reminder from its
    due time. UNTIL, written to the second, includes that second's occurrence."""
    dues = series(
        client, user, "2027-01-01T10:00:00.25+01:00", "FREQ=WEEKLY;UNTIL=20270115T090000Z", 10
    )
    assert dues == [
        "2027-01-01T09:00:00.250000Z",
        "2027-01-08T09:00:00.250000Z",
        "2027-01-15T09:00:00.250000Z",
    ]
    task = create(
        client,
        user,
        "Pay rent",
        due_at="2027-01-31T12:00:00.123456Z",
        remind_at="2027-01-31T11:30:00.654321Z",
        recurrence="FREQ=MONTHLY;BYMONTHDAY=-1",
    )
    following = client.get(
        user.url(f"/{complete(client, user, task['id']).json()['next_task_id']}"),
        headers=user.headers,
    ).json()
    assert (following["due_at"], following["remind_at"]) == (
        "2027-02-28T12:00:00.123456Z",
        "2027-02-28T11:30:00.654321Z",
    )


@pytest.mark.parametrize("via", ["patch", "put"])
def test_completion_creates_a_copy_and_says_which(
    client: TestClient, user: ApiUser, database: Database, via: str
) -> None:
    task = create(
        client,
        user,
        "Water plants",
        description="balcony",
        priority="medium",
        due_at="2027-03-01T07:00:00+02:00",
        tags=["home", "Garden"],
        recurrence="FREQ=WEEKLY",
    )
    resp = complete(client, user, task["id"], via)
    done = resp.json()
    assert done["completed"] is True and done["next_task_id"] is not None
    next_url = user.url(f"/{done['next_task_id']}")
    assert resp.headers["Link"] == f'<http://testserver{next_url}>; rel="next-occurrence"'
    following = client.get(next_url, headers=user.headers).json()
    assert {
        k: following[k] for k in ("title", "description", "priority", "tags", "recurrence")
    } == {
        "title": "Water plants",
        "description": "balcony",
        "priority": "medium",
        "tags": ["Garden", "home"],
        "recurrence": "FREQ=WEEKLY",
    }
    assert following["due_at"] == "2027-03-08T05:00:00Z"
    assert following["completed"] is False
    assert following["previous_task_id"] == task["id"] and following["next_task_id"] is None
    # The audit log: the completion, then the creation that names it as its cause.
    events = events_of(database.engine, user.user_id)[-2:]
    completion, creation = events
    assert completion["action"] == "task.completed"
    assert completion["changes"] == {
        "completed": [False, True],
        "next_task_id": [None, following["id"]],
    }
    assert creation["action"] == "task.created"
    assert creation["entity_id"] == str(following["id"])
    assert creation["caused_by_seq"] == completion["seq"]
    assert creation["after"]["previous_task_id"] == task["id"]
    assert completion["xact_id"] == creation["xact_id"]
    assert {e["hash_version"] for e in events} == {HASH_VERSION}  # caused_by_seq is hashed
    history = client.get(next_url + "/history", headers=user.headers).json()["items"]
    assert history[0]["caused_by_seq"] == completion["seq"]
    verify = client.get(f"/api/{user.user_id}/audit-events/verify", headers=user.headers).json()
    assert verify["ok"] is True, verify


def test_complete_reopen_complete_makes_one_next_occurrence(
    client: TestClient, user: ApiUser
) -> None:
    task = create(client, user, "Once", due_at="2027-01-01T00:00:00Z", recurrence="FREQ=DAILY")
    first = complete(client, user, task["id"]).json()["next_task_id"]
    reopened = client.patch(user.url(f"/{task['id']}/complete"), headers=user.headers).json()
    assert reopened["completed"] is False and reopened["next_task_id"] == first
    again = complete(client, user, task["id"], "put").json()
    assert again["next_task_id"] == first
    open_tasks = client.get(user.url(), params={"status": "pending"}, headers=user.headers).json()
    assert [t["id"] for t in open_tasks] == [first]


def test_editing_the_rule_changes_future_occurrences_only(
    client: TestClient, user: ApiUser
) -> None:
    task = create(client, user, "Edit", due_at="2027-01-04T09:00:00Z", recurrence="FREQ=DAILY")
    second_id = complete(client, user, task["id"]).json()["next_task_id"]
    second = client.put(
        user.url(f"/{second_id}"), json={"recurrence": "FREQ=WEEKLY"}, headers=user.headers
    ).json()
    assert second["due_at"] == "2027-01-05T09:00:00Z"
    first = client.get(user.url(f"/{task['id']}"), headers=user.headers).json()
    assert first["recurrence"] == "FREQ=DAILY"  # the past is not rewritten
    third_id = complete(client, user, second_id).json()["next_task_id"]
    third = client.get(user.url(f"/{third_id}"), headers=user.headers).json()
    assert (third["due_at"], third["recurrence"]) == ("2027-01-12T09:00:00Z", "FREQ=WEEKLY")
    # Removing the rule ends the series.
    client.put(user.url(f"/{third_id}"), json={"recurrence": None}, headers=user.headers)
    assert complete(client, user, third_id).json()["next_task_id"] is None


def test_a_task_without_rule_has_no_next(client: TestClient, user: ApiUser) -> None:
    task = create(client, user, "Plain", due_at="2027-01-04T09:00:00Z")
    resp = complete(client, user, task["id"])
    assert resp.json()["next_task_id"] is None and "Link" not in resp.headers


@pytest.mark.parametrize("body", [{"completed": True}, None])
def test_concurrent_completions_make_exactly_one_next_occurrence(
    live_server: LiveServer, user: ApiUser, database: Database, body: dict[str, Any] | None
) -> None:
    """Eight clients complete (or toggle) the same recurring task at once."""
    with live_server.client() as http:
        created = http.post(
            user.url(),
            json={"title": "Race", "due_at": "2027-01-01T00:00:00Z", "recurrence": "FREQ=DAILY"},
            headers=user.headers,
        ).json()
        barrier = threading.Barrier(8)
        statuses: list[int] = []

        def hit() -> None:
            with live_server.client() as mine:
                barrier.wait()
                resp = mine.patch(
                    user.url(f"/{created['id']}/complete"), json=body, headers=user.headers
                )
                statuses.append(resp.status_code)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        tasks = http.get(user.url(), headers=user.headers).json()
        occurrences = [t for t in tasks if t["previous_task_id"] == created["id"]]
        assert len(occurrences) == 1 and occurrences[0]["completed"] is False
        assert len(tasks) == 2
    created_events = [
        e for e in events_of(database.engine, user.user_id) if e["action"] == "task.created"
    ]
    assert len(created_events) == 2


# Rules that can never recur ------------------------------------------------------------

# (due_at, rule) with no date after due_at: UNTIL not after it, or before its next date; no
# month the rule visits has the day (BYMONTH is not supported: INTERVAL=12 from February is
# "February only"), with or without a COUNT left; or the next date is past year 9999.
NEVER = [
    ("2027-01-10T09:00:00Z", "FREQ=DAILY;UNTIL=20270101T000000Z"),
    ("2027-01-10T09:00:00Z", "FREQ=WEEKLY;UNTIL=20270110T090000Z"),
    ("2027-01-10T09:00:00Z", "FREQ=WEEKLY;UNTIL=20270116T000000Z"),
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31"),
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=30,-31;COUNT=5"),
    ("2027-04-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=24;BYMONTHDAY=31;UNTIL=20991231T000000Z"),
    ("2026-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=48;BYMONTHDAY=29"),
    ("0001-02-01T00:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31"),
    ("9999-03-01T00:00:00Z", "FREQ=YEARLY;COUNT=2"),
    ("9996-02-29T00:00:00Z", "FREQ=YEARLY"),
]
# Their neighbours that do recur, and COUNT=1, which says on purpose that none follows.
RECURS = [
    ("2027-01-10T09:00:00Z", "FREQ=WEEKLY;UNTIL=20270117T090000Z"),
    ("2027-01-10T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31"),  # 31 January
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;BYMONTHDAY=31"),
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=29"),  # 2028 is a leap year
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31;COUNT=1"),
    ("2027-01-10T09:00:00Z", "FREQ=DAILY;COUNT=1"),
    ("9998-03-01T00:00:00Z", "FREQ=YEARLY;COUNT=2"),
]


@pytest.mark.parametrize(("due", "rule"), NEVER)
def test_a_rule_that_can_never_recur_is_refused(
    client: TestClient, user: ApiUser, due: str, rule: str
) -> None:
    resp = client.post(
        user.url(), json={"title": "t", "due_at": due, "recurrence": rule}, headers=user.headers
    )
    body = assert_validation_error(resp, "body.recurrence")
    assert "would never recur" in str(body)


@pytest.mark.parametrize(("due", "rule"), RECURS)
def test_a_rule_with_a_date_after_due_at_or_count_1_is_accepted(
    client: TestClient, user: ApiUser, due: str, rule: str
) -> None:
    assert create(client, user, "t", due_at=due, recurrence=rule)["recurrence"] == rule


def test_an_update_is_checked_when_it_changes_the_rule_or_the_due_date(
    client: TestClient, user: ApiUser
) -> None:
    task = create(client, user, "U", due_at="2027-01-01T09:00:00Z", recurrence="FREQ=WEEKLY")
    url = user.url(f"/{task['id']}")
    for change in (
        {"recurrence": "FREQ=WEEKLY;UNTIL=20261231T000000Z"},
        {"due_at": "2027-02-01T09:00:00Z", "recurrence": "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=30"},
    ):
        resp = client.put(url, json=change, headers=user.headers)
        assert_validation_error(resp, "body.recurrence")
    assert client.get(url, headers=user.headers).json() == task
    # The last occurrence of an UNTIL series has no date left: it is kept, and edited, as it
    # is; moving its due date keeps the rule only if the rule then has a date after it.
    dues = series(client, user, "2027-01-01T09:00:00Z", "FREQ=WEEKLY;UNTIL=20270108T090000Z", 1)
    assert dues == ["2027-01-01T09:00:00Z", "2027-01-08T09:00:00Z"]
    (last,) = [
        t
        for t in client.get(user.url(), params={"status": "pending"}, headers=user.headers).json()
        if t["due_at"] == "2027-01-08T09:00:00Z"
    ]
    last_url = user.url(f"/{last['id']}")
    resp = client.put(last_url, json={"title": "Last one"}, headers=user.headers)
    assert resp.status_code == 200, resp.text
    resp = client.put(last_url, json={"due_at": "2027-01-09T09:00:00Z"}, headers=user.headers)
    assert_validation_error(resp, "body.recurrence")
    resp = client.put(
        last_url,
        json={"due_at": "2027-01-01T09:00:00Z", "recurrence": "FREQ=WEEKLY;COUNT=1"},
        headers=user.headers,
    )
    assert resp.status_code == 200, resp.text
    assert complete(client, user, last["id"]).json()["next_task_id"] is None


@pytest.mark.parametrize(("due", "rule"), NEVER + RECURS)
def test_the_bounded_search_for_the_next_date_agrees_with_dateutil(due: str, rule: str) -> None:
    """The shortcut for rules none of whose months has the day finds what dateutil's own
    search up to year 9999 finds (what each costs: bench/recurrence.py)."""
    due_at = datetime.fromisoformat(due)
    parts = dict(part.split("=") for part in rule.split(";") if not part.startswith("COUNT"))
    full = rrulestr(";".join(f"{k}={v}" for k, v in parts.items()), dtstart=due_at)
    try:
        expected = full.after(due_at, inc=False)
    except (ValueError, OverflowError):
        expected = None
    found = recurrence.next_occurrence(rule, due_at)
    if "COUNT=1" not in rule:
        assert (found.due_at if found else None) == expected
