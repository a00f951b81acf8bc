"""GET /api/{user_id}/audit-events: the caller's events, newest first, keyset-paged."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient

from audit.chain import compute_hash
from audit.recorder import AuditContext
from service.app import create_app
from service.database import Database
from service.settings import Settings
from service.tasks import rules
from tests.audit_helpers import change, events_of
from tests.support import create_task

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
EVENT_FIELDS = {
    "id", "seq", "occurred_at", "user_id", "actor_id", "action", "entity_type", "entity_id",
    "before", "after", "changes", "request_id", "trace_id", "span_id", "client_ip",
    "user_agent", "prev_hash", "hash", "hash_version", "caused_by_seq", "trace_url",
}  # fmt: skip


def feed_url(user: Any) -> str:
    return f"/api/{user.user_id}/audit-events"


def get_feed(client: TestClient, user: Any, **params: Any) -> dict[str, Any]:
    response = client.get(feed_url(user), params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def walk(client: TestClient, user: Any, **params: Any) -> list[dict[str, Any]]:
    """Every page, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = get_feed(client, user, **params, **({"cursor": cursor} if cursor else {}))
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def make_changes(client: TestClient, user: Any, count: int) -> None:
    task = create_task(client, user, "Counter 0")
    for n in range(1, count):
        change(client, "PUT", f"/{task['id']}", user, json={"title": f"Counter {n}"})


def test_feed_lists_newest_first_with_every_field(
    client: TestClient, user: Any, database: Database
) -> None:
    task = create_task(client, user, "Feed", "text")
    change(client, "PATCH", f"/{task['id']}/complete", user)
    page = get_feed(client, user)
    assert page["next_cursor"] is None
    assert [e["action"] for e in page["items"]] == ["task.completed", "task.created"]
    stored = {e["seq"]: e for e in events_of(database.engine, user.user_id)}
    for item in page["items"]:
        assert set(item) == EVENT_FIELDS
        assert RFC3339_UTC.fullmatch(item["occurred_at"])
        assert item["trace_url"] is None
        row = stored[item["seq"]]
        assert {k: v for k, v in item.items() if k not in ("occurred_at", "trace_url")} == {
            k: row[k] for k in EVENT_FIELDS if k not in ("occurred_at", "trace_url")
        }
        # The JSON carries exactly what was hashed: a client can recompute the hash.
        assert compute_hash(item) == item["hash"]


def test_a_new_user_has_an_empty_feed(client: TestClient, user: Any) -> None:
    assert get_feed(client, user) == {"items": [], "next_cursor": None}


def test_pages_cover_every_event_once(client: TestClient, user: Any) -> None:
    make_changes(client, user, 10)
    first = get_feed(client, user, limit=3)
    assert [e["seq"] for e in first["items"]] == [10, 9, 8]
    assert [e["seq"] for e in walk(client, user, limit=3)] == list(range(10, 0, -1))
    assert [e["seq"] for e in walk(client, user, limit=10)] == list(range(10, 0, -1))
    assert get_feed(client, user, limit=10)["next_cursor"] is None


def test_pagination_while_new_events_arrive(client: TestClient, user: Any) -> None:
    """Events appended between page reads are not mixed into the walk: no duplicates, no gaps."""
    make_changes(client, user, 12)
    task = create_task(client, user, "Arriving")
    seen: list[int] = []
    page = get_feed(client, user, limit=4)
    while True:
        seen.extend(e["seq"] for e in page["items"])
        # Another client writes while this one pages.
        change(client, "PUT", f"/{task['id']}", user, json={"title": f"Arriving {len(seen)}"})
        if page["next_cursor"] is None:
            break
        page = get_feed(client, user, limit=4, cursor=page["next_cursor"])
    assert seen == list(range(13, 0, -1))
    # The newer events are at the top of a fresh walk.
    assert [e["seq"] for e in walk(client, user, limit=5)] == list(range(17, 0, -1))


def test_filters(client: TestClient, user: Any, database: Database) -> None:
    first = create_task(client, user, "First")
    second = create_task(client, user, "Second")
    response = client.put(
        user.url(f"/{first['id']}"),
        json={"title": "First again"},
        headers={**user.headers, "X-Request-ID": f"req-{user.user_id}"},
    )
    assert response.status_code == 200
    change(client, "PATCH", f"/{second['id']}/complete", user)
    change(client, "DELETE", f"/{first['id']}", user)

    def seqs(**params: Any) -> list[int]:
        return [e["seq"] for e in walk(client, user, limit=2, **params)]

    assert seqs(task_id=first["id"]) == [5, 3, 1]
    assert seqs(task_id=second["id"]) == [4, 2]
    assert seqs(action="task.created") == [2, 1]
    assert seqs(action="task.deleted") == [5]
    assert seqs(action="task.reopened") == []
    assert seqs(request_id=f"req-{user.user_id}") == [3]
    assert seqs(task_id=first["id"], action="task.updated") == [3]
    assert seqs(task_id=999_999_999) == []

    times = {e["seq"]: e["occurred_at"] for e in events_of(database.engine, user.user_id)}
    # since is inclusive, until exclusive.
    assert seqs(since=times[3].isoformat()) == [5, 4, 3]
    assert seqs(until=times[3].isoformat()) == [2, 1]
    assert seqs(since=times[2].isoformat(), until=times[4].isoformat()) == [3, 2]
    # Any zone is accepted and compared as the same instant.
    in_tokyo = times[4].astimezone(timezone(timedelta(hours=9))).isoformat()
    assert seqs(since=in_tokyo) == [5, 4]
    assert seqs(since=(times[5] + timedelta(seconds=1)).isoformat()) == []


def test_bounds_finer_than_a_microsecond_compare_exactly(
    client: TestClient, user: Any, database: Database
) -> None:
    """Events are timed to the microsecond; a bound with more digits was cut, so an inclusive
    `since` of .4200075 returned the event of .420007, before it."""
    task = create_task(client, user, "First")
    change(client, "PUT", f"/{task['id']}", user, json={"title": "Second"})
    times = {e["seq"]: e["occurred_at"] for e in events_of(database.engine, user.user_id)}

    def finer(seq: int, digit: str) -> str:
        """The event's time in +01:00, with a seventh fractional digit."""
        text = times[seq].astimezone(timezone(timedelta(hours=1))).isoformat("T", "microseconds")
        return text[: -len("+01:00")] + digit + "+01:00"

    def seqs(**params: Any) -> list[int]:
        return [e["seq"] for e in walk(client, user, limit=10, **params)]

    assert seqs(since=finer(2, "5")) == []
    assert seqs(since=finer(2, "0")) == [2]
    assert seqs(since=finer(1, "5")) == [2]
    assert seqs(until=finer(2, "5")) == [2, 1]
    assert seqs(until=finer(2, "0")) == [1]


def test_trace_filter_and_trace_url(
    settings: Settings, database: Database, client: TestClient, user: Any
) -> None:
    task = create_task(client, user, "Traced")
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    ctx = AuditContext(actor_id=user.user_id, trace_id=trace_id, span_id=span_id)
    with database.unit_of_work() as session:
        rules.set_completed(session, ctx, user.user_id, task["id"], True)

    items = get_feed(client, user, trace_id=trace_id)["items"]
    assert [(e["action"], e["trace_id"], e["span_id"]) for e in items] == [
        ("task.completed", trace_id, span_id)
    ]
    assert items[0]["trace_url"] is None  # JAEGER_UI_URL is not set

    with_jaeger = settings.model_copy(update={"jaeger_ui_url": "http://jaeger.local:16686/"})
    with TestClient(create_app(with_jaeger, database)) as jaeger_client:
        items = get_feed(jaeger_client, user)["items"]
    assert items[0]["trace_url"] == f"http://jaeger.local:16686/trace/{trace_id}"
    for item in items:
        expected = item["trace_id"] and f"http://jaeger.local:16686/trace/{item['trace_id']}"
        assert item["trace_url"] == expected


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"cursor": "garbage!"},
        {"cursor": ""},
        {"cursor": _b64("f.0")},
        {"cursor": _b64("f.-3")},
        {"cursor": _b64("f.99999999999999999999")},
        {"cursor": _b64("h.5")},  # a history cursor
        {"cursor": _b64("f.5 ")},
        {"cursor": "A" * 65},
        # Only the cursor the API wrote: not one with junk a lax decoder skips ('Zi4z!!' reads
        # as 'f.3'), padding, a leading zero or a trailing newline.
        {"cursor": _b64("f.3") + "!!"},
        {"cursor": _b64("f.3") + "=="},
        {"cursor": _b64("f.03")},
        {"cursor": _b64("f.33") + "\n"},
        {"action": "task.exploded"},
        {"action": "TASK.CREATED"},
        {"task_id": 0},
        {"task_id": 2**63},
        {"task_id": "abc"},
        {"since": "2026-01-01T00:00:00"},  # no time zone
        {"until": "2026-01-01 10:00"},
        {"since": "yesterday"},
        {"since": "9999-12-31T23:59:59-12:00"},  # no UTC equivalent
        {"until": "0001-01-01T00:00:00+01:00"},
        {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"request_id": "x" * 129},
        {"request_id": "bad\x00id"},
        {"request_id": "tab\tid"},
        {"trace_id": "xyz"},
        {"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736"},
        {"trace_id": "4bf92f3577b34da6a3ce929d0e0e47360"},
    ],
)
def test_bad_parameters_are_400(client: TestClient, user: Any, params: dict[str, Any]) -> None:
    response = client.get(feed_url(user), params=params, headers=user.headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 400


def test_limit_bounds_are_accepted(client: TestClient, user: Any) -> None:
    make_changes(client, user, 2)
    assert len(get_feed(client, user, limit=1)["items"]) == 1
    assert len(get_feed(client, user, limit=500)["items"]) == 2


def test_only_the_callers_events(client: TestClient, make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    task = create_task(client, alice, "Alice's")
    create_task(client, bob, "Bob's")
    assert {e["user_id"] for e in walk(client, bob)} == {bob.user_id}
    # Alice's task id in Bob's feed filter matches nothing of Bob's.
    assert get_feed(client, bob, task_id=task["id"])["items"] == []
    # Bob's token on Alice's feed: 403; no token: 401.
    response = client.get(feed_url(alice), headers=bob.headers)
    assert response.status_code == 403
    assert client.get(feed_url(alice)).status_code == 401
    assert client.get(feed_url(alice) + "/verify", headers=bob.headers).status_code == 403


def test_cursor_is_opaque_and_stable(client: TestClient, user: Any) -> None:
    make_changes(client, user, 3)
    cursor = get_feed(client, user, limit=1)["next_cursor"]
    assert cursor and re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    again = get_feed(client, user, limit=1, cursor=cursor)
    assert [e["seq"] for e in again["items"]] == [2]


def test_occurred_at_follows_seq(client: TestClient, user: Any) -> None:
    make_changes(client, user, 5)
    times = [datetime.fromisoformat(e["occurred_at"]) for e in walk(client, user)]
    assert times == sorted(times, reverse=True)


def test_extreme_but_valid_times(client: TestClient, user: Any) -> None:
    make_changes(client, user, 2)
    params = {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"}
    assert [e["seq"] for e in get_feed(client, user, **params)["items"]] == [2, 1]


def test_an_offset_whose_plus_became_a_space_in_the_url_is_named(
    client: TestClient, user: Any
) -> None:
    """`?since=2026-11-24T10:00:00+01:00` typed into curl or an address bar arrives as
    `...10:00:00 01:00` (a `+` in a query string is a space): the 400 said the time had no
    zone, which the person had written; it says what happened to the `+`."""
    for name in ("since", "until"):
        response = client.get(
            f"{feed_url(user)}?{name}=2026-11-24T10:00:00+01:00", headers=user.headers
        )
        assert response.status_code == 400, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == f"query.{name}"
        assert "%2B" in error["message"], error
    response = client.get(
        f"{feed_url(user)}?since=2026-11-24T10:00:00%2B01:00", headers=user.headers
    )
    assert response.status_code == 200, response.text
    # Anything else keeps the plain message.
    response = client.get(feed_url(user), params={"since": "tomorrow"}, headers=user.headers)
    assert "%2B" not in response.json()["errors"][0]["message"]
