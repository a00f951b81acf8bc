"""The task fields of issue #11 over HTTP: priority, due_at, tags and recurrence, their
validation (with the 400 messages), defaults for old clients, and null clearing."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support import ApiUser, assert_validation_error
from tests.support import create_task as create

# POST and PUT word this rule alike, naming the field that breaks it.
UNTIL_FORM = "UNTIL must be a UTC time written like 20271231T235959Z"
NEEDS_DUE = "A recurring task needs a due_at"
NEW_DEFAULTS = {
    "priority": "none",
    "due_at": None,
    "tags": [],
    "recurrence": None,
    "previous_task_id": None,
    "next_task_id": None,
}


def messages(body: dict[str, Any]) -> str:
    return " | ".join(f"{e['field']}: {e['message']}" for e in body["errors"])


def test_old_client_sees_only_defaults(client: TestClient, user: ApiUser) -> None:
    task = create(client, user, "Old", description="client")
    assert {k: task[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS
    put = client.put(user.url(f"/{task['id']}"), json={"title": "Still old"}, headers=user.headers)
    assert put.status_code == 200
    assert {k: put.json()[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS
    listed = client.get(user.url(), headers=user.headers).json()
    assert {k: listed[0][k] for k in NEW_DEFAULTS} == NEW_DEFAULTS


def test_all_fields_on_create_and_due_at_returned_in_utc(client: TestClient, user: ApiUser) -> None:
    task = create(
        client,
        user,
        "Everything",
        priority="high",
        due_at="2026-12-24T18:30:00+01:00",
        tags=["work", "Home"],
        recurrence="FREQ=WEEKLY;BYDAY=TH",
    )
    assert task["priority"] == "high"
    assert task["due_at"] == "2026-12-24T17:30:00Z"
    assert task["tags"] == ["Home", "work"]
    assert task["recurrence"] == "FREQ=WEEKLY;BYDAY=TH"
    again = client.get(user.url(f"/{task['id']}"), headers=user.headers).json()
    assert again == task


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"priority": "urgent"}, "body.priority", "'none', 'low', 'medium' or 'high'"),
        ({"priority": None}, "body.priority", "'none', 'low', 'medium' or 'high'"),
        ({"due_at": "2026-12-24T18:30:00"}, "body.due_at", "RFC 3339 date-time with a zone"),
        ({"due_at": "2026-12-24"}, "body.due_at", "RFC 3339 date-time with a zone"),
        ({"due_at": 1700000000}, "body.due_at", "RFC 3339 date-time with a zone"),
        ({"due_at": "tomorrow"}, "body.due_at", "RFC 3339 date-time with a zone"),
        ({"tags": "work"}, "body.tags", "valid list"),
        ({"tags": [" "]}, "body.tags.0", "a tag name must not be blank"),
        ({"tags": ["x" * 51]}, "body.tags.0", "at most 50 characters"),
        ({"tags": ["bad\x07bell"]}, "body.tags.0", "control characters"),
        ({"tags": [f"t{i}" for i in range(21)]}, "body.tags", "at most 20 items"),
        ({"recurrence": "FREQ=HOURLY"}, "body.recurrence", "FREQ=HOURLY is not supported"),
        ({"recurrence": "FREQ=DAILY;BYHOUR=9"}, "body.recurrence", "BYHOUR is not supported"),
        ({"recurrence": "FREQ=YEARLY;BYMONTH=2"}, "body.recurrence", "BYMONTH is not supported"),
        (
            {"recurrence": "FREQ=DAILY;BYDAY=MO"},
            "body.recurrence",
            "BYDAY is supported with FREQ=WEEKLY only",
        ),
        (
            {"recurrence": "FREQ=WEEKLY;BYMONTHDAY=1"},
            "body.recurrence",
            "BYMONTHDAY is supported with FREQ=MONTHLY only",
        ),
        (
            {"recurrence": "FREQ=WEEKLY;BYDAY=1MO"},
            "body.recurrence",
            "BYDAY=1MO is not supported",
        ),
        (
            {"recurrence": "FREQ=DAILY;COUNT=3;UNTIL=20270101T000000Z"},
            "body.recurrence",
            "give COUNT or UNTIL, not both",
        ),
        ({"recurrence": "FREQ=DAILY;INTERVAL=0"}, "body.recurrence", "INTERVAL must be between"),
        ({"recurrence": "FREQ=DAILY;COUNT=0"}, "body.recurrence", "COUNT must be between"),
        # RFC 5545's numbers are ASCII digits; Python's int() also reads these (Arabic-Indic).
        (
            {"recurrence": "FREQ=DAILY;COUNT=\u0661\u0660"},
            "body.recurrence",
            "COUNT must be between",
        ),
        ({"recurrence": "FREQ=DAILY;COUNT=1_0"}, "body.recurrence", "COUNT must be between"),
        ({"recurrence": "FREQ=DAILY;COUNT=+3"}, "body.recurrence", "COUNT must be between"),
        (
            {"recurrence": "FREQ=DAILY;INTERVAL=\u0662"},
            "body.recurrence",
            "INTERVAL must be between",
        ),
        ({"recurrence": "FREQ=DAILY;INTERVAL=1_0"}, "body.recurrence", "INTERVAL must be between"),
        ({"recurrence": "FREQ=DAILY;INTERVAL=+2"}, "body.recurrence", "INTERVAL must be between"),
        (
            {"recurrence": "FREQ=MONTHLY;BYMONTHDAY=\u0661"},
            "body.recurrence",
            "BYMONTHDAY=\u0661 is not a day of the month",
        ),
        (
            {"recurrence": "FREQ=DAILY;UNTIL=20270101"},
            "body.recurrence",
            "UNTIL values must be specified in UTC",
        ),
        *(
            ({"recurrence": f"FREQ=DAILY;UNTIL={until}"}, "body.recurrence", UNTIL_FORM)
            # dateutil reads each one (the offset ones not as UTC); RFC 5545 has one form.
            for until in (
                "20271231T235959+01",
                "20271231T235959-0000",
                "20271231T235959UTC",
                "20271231T2359Z",
                "2027-12-31T235959Z",
                "20271231T235959.5Z",
            )
        ),
        # Names and values are ASCII, read case-insensitively in ASCII only: str.upper() reads
        # a dotless i as I and a long s as S, and str.strip() takes other scripts' spaces.
        ({"recurrence": "FREQ=dA\u0131LY"}, "body.recurrence", "FREQ=DA\u0131LY is not supported"),
        ({"recurrence": "\u0131nterval=2;FREQ=DAILY"}, "body.recurrence", "\u0131NTERVAL is not"),
        (
            {"recurrence": "FREQ=DAILY;UNT\u0131L=20271231T235959Z"},
            "body.recurrence",
            "UNT\u0131L is not supported",
        ),
        (
            {"recurrence": "FREQ=WEEKLY;BYDAY=\u017fa"},
            "body.recurrence",
            "BYDAY=\u017fA is not supported",
        ),
        (
            {"recurrence": "FREQ=WEEKLY;BYDAY=MO,\u00a0WE"},
            "body.recurrence",
            "invalid 'BYDAY'",
        ),
        ({"recurrence": "\u3000FREQ=DAILY"}, "body.recurrence", "is not supported"),
        ({"recurrence": "FREQ=DAILY\x1c"}, "body.recurrence", "control characters (found U+001C)"),
        ({"recurrence": "FREQ=FORTNIGHTLY"}, "body.recurrence", "not a valid RRULE"),
        ({"recurrence": "INTERVAL=2"}, "body.recurrence", "FREQ is required"),
        (
            {"recurrence": "DTSTART:20260101T000000Z\nRRULE:FREQ=DAILY"},
            "body.recurrence",
            "only the RRULE value is supported",
        ),
        (
            {"recurrence": "FREQ=MONTHLY;BYMONTHDAY=32"},
            "body.recurrence",
            "BYMONTHDAY=32 is not a day of the month",
        ),
        ({"recurrence": "FREQ=DAILY"}, "body.recurrence", NEEDS_DUE),
        ({"recurrence": "FREQ=DAILY", "due_at": None}, "body.recurrence", NEEDS_DUE),
    ],
)
def test_create_validation_messages(
    client: TestClient, user: ApiUser, body: dict[str, Any], field: str, message: str
) -> None:
    if "due_at" not in body and "recurrence" in body and message != NEEDS_DUE:
        body = {**body, "due_at": "2026-12-01T09:00:00Z"}
    resp = client.post(user.url(), json={"title": "T", **body}, headers=user.headers)
    error = assert_validation_error(resp, field)
    assert message in messages(error), messages(error)
    assert client.get(user.url(), headers=user.headers).json() == []


def test_rule_is_normalized(client: TestClient, user: ApiUser) -> None:
    task = create(
        client,
        user,
        "Rule",
        due_at="2026-12-01T09:00:00Z",
        recurrence="RRULE:count=5;freq=monthly;bymonthday=-1",
    )
    assert task["recurrence"] == "FREQ=MONTHLY;BYMONTHDAY=-1;COUNT=5"
    weekly = create(
        client, user, "List", due_at="2026-12-01T09:00:00Z", recurrence="FREQ=WEEKLY;BYDAY=mo , we"
    )
    assert weekly["recurrence"] == "FREQ=WEEKLY;BYDAY=MO,WE"
    # One spelling per rule: the same rule written otherwise is no change.
    spelled = create(
        client,
        user,
        "Spelled",
        due_at="2026-12-01T09:00:00Z",
        recurrence="FREQ=MONTHLY;INTERVAL=02;BYMONTHDAY=+5,-05,5;COUNT=007",
    )
    assert spelled["recurrence"] == "FREQ=MONTHLY;INTERVAL=2;BYMONTHDAY=5,-5;COUNT=7"
    url = user.url(f"/{spelled['id']}")
    before = client.get(url, headers=user.headers)
    again = client.put(
        url,
        json={"recurrence": "FREQ=MONTHLY;INTERVAL=2;BYMONTHDAY=5,-5,-5;COUNT=7"},
        headers=user.headers,
    )
    assert again.status_code == 200 and again.headers["ETag"] == before.headers["ETag"]
    days = create(
        client, user, "Days", due_at="2026-12-01T09:00:00Z", recurrence="FREQ=WEEKLY;BYDAY=MO,MO"
    )
    assert days["recurrence"] == "FREQ=WEEKLY;BYDAY=MO"


def test_tags_are_deduplicated_case_insensitively_first_spelling_kept(
    client: TestClient, user: ApiUser
) -> None:
    first = create(client, user, "A", tags=["  Work ", "work", "WORK", "urgent"])
    assert first["tags"] == ["urgent", "Work"]
    second = create(client, user, "B", tags=["wOrK"])
    assert second["tags"] == ["Work"]
    tags = client.get(f"/api/{user.user_id}/tags", headers=user.headers).json()
    assert [(t["name"], t["task_count"]) for t in tags] == [("urgent", 1), ("Work", 2)]


def test_twenty_tags_is_the_limit(client: TestClient, user: ApiUser) -> None:
    names = [f"tag{i:02}" for i in range(20)]
    assert create(client, user, "Many", tags=names)["tags"] == names


def test_put_sets_and_clears_each_field(client: TestClient, user: ApiUser) -> None:
    task = create(client, user, "Edit")
    url = user.url(f"/{task['id']}")
    body = {
        "priority": "medium",
        "due_at": "2027-01-31T23:00:00-05:00",
        "tags": ["b", "a"],
        "recurrence": "FREQ=DAILY",
    }
    updated = client.put(url, json=body, headers=user.headers).json()
    assert updated["priority"] == "medium"
    assert updated["due_at"] == "2027-02-01T04:00:00Z"
    assert updated["tags"] == ["a", "b"]
    assert updated["recurrence"] == "FREQ=DAILY"
    # Clearing due_at while the task recurs is refused, and changes nothing.
    refused = client.put(url, json={"due_at": None}, headers=user.headers)
    error = assert_validation_error(refused, "body.recurrence")
    assert NEEDS_DUE in messages(error)
    assert client.get(url, headers=user.headers).json() == updated
    cleared = client.put(
        url, json={"recurrence": None, "due_at": None, "tags": []}, headers=user.headers
    ).json()
    assert (cleared["recurrence"], cleared["due_at"], cleared["tags"]) == (None, None, [])
    assert cleared["priority"] == "medium"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"priority": None}, "body.priority"),
        ({"tags": None}, "body.tags"),
        ({"priority": "critical"}, "body.priority"),
        ({"due_at": "2027-01-01T00:00:00"}, "body.due_at"),
        ({"recurrence": "FREQ=MINUTELY"}, "body.recurrence"),
    ],
)
def test_put_validation(
    client: TestClient, user: ApiUser, body: dict[str, Any], field: str
) -> None:
    task = create(client, user, "Edit")
    resp = client.put(user.url(f"/{task['id']}"), json=body, headers=user.headers)
    assert_validation_error(resp, field)


def test_put_same_tags_in_other_case_order_is_a_no_op(client: TestClient, user: ApiUser) -> None:
    task = create(client, user, "Same", tags=["Alpha", "beta"])
    url = user.url(f"/{task['id']}")
    resp = client.put(url, json={"tags": ["BETA", "alpha"]}, headers=user.headers)
    assert resp.status_code == 200
    assert resp.json() == task  # nothing changed: same version, same updated_at
    history = client.get(user.url(f"/{task['id']}/history"), headers=user.headers).json()
    assert [e["action"] for e in history["items"]] == ["task.created"]


def test_openapi_describes_new_fields_enums_and_parameters(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    public = schemas["TaskPublic"]["properties"]
    for name in ("priority", "due_at", "tags", "recurrence", "previous_task_id", "next_task_id"):
        assert name in public, name
    assert schemas["Priority"]["enum"] == ["none", "low", "medium", "high"]
    for model in ("TaskCreate", "TaskUpdate"):
        props = schemas[model]["properties"]
        assert {"priority", "due_at", "tags", "recurrence"} <= set(props)
    assert "RRULE" in schemas["TaskCreate"]["properties"]["recurrence"]["description"]
    params = {p["name"]: p for p in spec["paths"]["/api/{user_id}/tasks"]["get"]["parameters"]}
    for name in ("status", "q", "priority", "tag", "due_before", "due_after", "overdue", "sort"):
        assert name in params, name
    assert params["priority"]["schema"]["anyOf"][0]["type"] == "array"
    sort = schemas["SortField"]["enum"]
    assert sort == ["created_at", "updated_at", "title", "due_at", "priority"]
    for path in ("/api/{user_id}/tags", "/api/{user_id}/tags/{tag_id}"):
        assert path in spec["paths"]
    assert set(spec["paths"]["/api/{user_id}/tags/{tag_id}"]) >= {"get", "patch", "delete"}
