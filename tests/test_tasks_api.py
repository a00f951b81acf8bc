"""The task API through HTTP: CRUD, listing, validation, ETags, users, OpenAPI and CORS."""

from __future__ import annotations

import itertools
import re
from dataclasses import fields
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from audit.recorder import AuditContext
from service.app import create_app
from service.auth import create_dev_token
from service.database import Database
from service.settings import Settings
from service.tasks import rules
from service.tasks.models import TaskCreate, TaskPublic
from tests.support import (
    PROBLEM_JSON,
    TEST_SECRET,
    ApiUser,
    MakeUser,
    assert_problem,
    assert_validation_error,
    bearer,
    create_task,
    link_url,
    list_all,
)


def titles(items: list[dict[str, Any]]) -> list[str]:
    return [item["title"] for item in items]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


# Health -------------------------------------------------------------------------------


def test_health_endpoints_need_no_auth(client: TestClient) -> None:
    """Probes run without credentials; readiness really asks the database."""
    assert client.get("/healthz").json() == {"status": "ok", "version": "0.1.0"}
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json()["database"] == "ok"


# Create -------------------------------------------------------------------------------


def test_create_returns_201_with_location_and_etag(client: TestClient, user: ApiUser) -> None:
    """The Location of a new task is where it can be read back."""
    resp = client.post(
        user.url(), json={"title": "Buy milk", "description": "2 l"}, headers=user.headers
    )
    assert resp.status_code == 201
    task = resp.json()
    assert task["title"] == "Buy milk" and task["description"] == "2 l"
    assert task["completed"] is False and task["user_id"] == user.user_id
    assert task["created_at"] == task["updated_at"]
    assert resp.headers["ETag"]

    location = resp.headers["Location"]
    assert location.endswith(user.url(f"/{task['id']}"))
    fetched = client.get(location, headers=user.headers)
    assert fetched.status_code == 200
    assert fetched.json() == task
    assert fetched.headers["ETag"] == resp.headers["ETag"]


@pytest.mark.parametrize(
    ("title", "stored"),
    [
        ("  Buy milk \t\n", "Buy milk"),
        ("x" * 200, "x" * 200),
        ("   " + "y" * 194 + "   ", "y" * 194),
        ("é" * 200, "é" * 200),
        ("a", "a"),
    ],
)
def test_title_is_trimmed_and_bounded_after_trimming(
    client: TestClient, user: ApiUser, title: str, stored: str
) -> None:
    """Stored trimmed; at most 200 characters as sent (the documented maxLength)."""
    assert create_task(client, user, title)["title"] == stored


def test_description_bounds_and_null(client: TestClient, user: ApiUser) -> None:
    assert create_task(client, user, description="d" * 1000)["description"] == "d" * 1000
    assert create_task(client, user, description=None)["description"] is None
    assert create_task(client, user)["description"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": ""}, "body.title"),
        ({"title": "   \t "}, "body.title"),
        ({"title": "x" * 201}, "body.title"),
        ({"title": " " + "x" * 201 + " "}, "body.title"),
        # As documented (maxLength 200): the title as sent, padding included.
        ({"title": " " + "x" * 199 + "  "}, "body.title"),
        ({"title": None}, "body.title"),
        ({"title": 5}, "body.title"),
        ({}, "body.title"),
        ({"description": "no title"}, "body.title"),
        ({"title": "a\x00b"}, "body.title"),
        ({"title": "ok", "description": "d" * 1001}, "body.description"),
        ({"title": "ok", "description": "nul \x00 inside"}, "body.description"),
        ({"title": "ok", "description": 7}, "body.description"),
        ({"title": "ok", "id": 1}, "body.id"),
        ({"title": "ok", "user_id": "someone-else"}, "body.user_id"),
        ({"title": "ok", "completed": True}, "body.completed"),
        ({"title": "ok", "created_at": "2020-01-01T00:00:00Z"}, "body.created_at"),
        ({"title": "ok", "updated_at": "2020-01-01T00:00:00Z"}, "body.updated_at"),
        (["title"], "body"),
        ("just a string", "body"),
    ],
)
def test_create_rejects_invalid_bodies(
    client: TestClient, user: ApiUser, body: Any, field: str
) -> None:
    """Bad input is a 400 naming the field, unknown fields included; nothing is stored."""
    resp = client.post(user.url(), json=body, headers=user.headers)
    assert_validation_error(resp, field)
    assert list_all(client, user) == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"title": "\\u0000"}',
        b'{"title": "ok", "description": "a\\u0000b"}',
        b'{"title": "\\ud800"}',
        b'{"title": "ok",',
        b"\xff\xfe",
    ],
)
def test_create_rejects_bad_json_without_500(client: TestClient, user: ApiUser, raw: bytes) -> None:
    """NUL, lone surrogates and broken JSON are client errors, never a database error."""
    resp = client.post(
        user.url(), content=raw, headers={**user.headers, "Content-Type": "application/json"}
    )
    assert_validation_error(resp)
    assert list_all(client, user) == []


# List ---------------------------------------------------------------------------------


def test_list_defaults_to_all_newest_first(client: TestClient, user: ApiUser) -> None:
    first = create_task(client, user, "first")
    second = create_task(client, user, "second")
    client.patch(user.url(f"/{first['id']}/complete"), headers=user.headers)
    resp = client.get(user.url(), headers=user.headers)
    assert resp.status_code == 200
    assert [t["id"] for t in resp.json()] == [second["id"], first["id"]]
    assert resp.headers["X-Total-Count"] == "2"
    assert "Link" not in resp.headers


def test_status_filter(client: TestClient, user: ApiUser) -> None:
    done = create_task(client, user, "done")
    create_task(client, user, "open")
    client.patch(user.url(f"/{done['id']}/complete"), headers=user.headers)
    assert titles(list_all(client, user, status="completed")) == ["done"]
    assert titles(list_all(client, user, status="pending")) == ["open"]
    assert sorted(titles(list_all(client, user, status="all"))) == ["done", "open"]
    resp = client.get(user.url(), params={"status": "pending"}, headers=user.headers)
    assert resp.headers["X-Total-Count"] == "1"


def test_search_is_case_insensitive_in_title_and_description(
    client: TestClient, user: ApiUser
) -> None:
    create_task(client, user, "Buy MILK")
    create_task(client, user, "Groceries", description="oat milk and bread")
    create_task(client, user, "Call mum")
    assert sorted(titles(list_all(client, user, q="milk"))) == ["Buy MILK", "Groceries"]
    assert titles(list_all(client, user, q="BREAD")) == ["Groceries"]
    assert titles(list_all(client, user, q="mUm")) == ["Call mum"]
    assert list_all(client, user, q="nothing like it") == []


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("%", ["100% sure"]),
        ("100%", ["100% sure"]),
        ("_", ["a_b"]),
        ("a_b", ["a_b"]),
        ("/", ["c/d"]),
        ("\\", ["back\\slash"]),
    ],
)
def test_search_takes_wildcards_literally(
    client: TestClient, user: ApiUser, q: str, expected: list[str]
) -> None:
    """`%` and `_` are characters to find, not LIKE patterns."""
    for title in ("100% sure", "1000 things", "a_b", "axb", "c/d", "back\\slash"):
        create_task(client, user, title)
    assert titles(list_all(client, user, q=q)) == expected


def test_search_with_status_filter_and_count(client: TestClient, user: ApiUser) -> None:
    done = create_task(client, user, "report A")
    create_task(client, user, "report B")
    create_task(client, user, "other")
    client.patch(user.url(f"/{done['id']}/complete"), headers=user.headers)
    resp = client.get(user.url(), params={"q": "report", "status": "pending"}, headers=user.headers)
    assert titles(resp.json()) == ["report B"]
    assert resp.headers["X-Total-Count"] == "1"


def test_sort_and_order(client: TestClient, user: ApiUser) -> None:
    """Every sort field in both orders; equal keys are ordered by id, the same way."""
    a = create_task(client, user, "bravo")
    b = create_task(client, user, "alpha")
    c = create_task(client, user, "charlie")
    d = create_task(client, user, "alpha")  # ties with b on title
    ids = {t["id"]: name for t, name in ((a, "a"), (b, "b"), (c, "c"), (d, "d"))}

    def order(**params: str) -> list[str]:
        return [ids[t["id"]] for t in list_all(client, user, **params)]

    assert order() == ["d", "c", "b", "a"]
    assert order(sort="created_at", order="desc") == ["d", "c", "b", "a"]
    assert order(sort="created_at", order="asc") == ["a", "b", "c", "d"]
    assert order(sort="title", order="asc") == ["b", "d", "a", "c"]
    assert order(sort="title", order="desc") == ["c", "a", "d", "b"]

    client.put(user.url(f"/{b['id']}"), json={"description": "touched"}, headers=user.headers)
    client.put(user.url(f"/{a['id']}"), json={"description": "touched"}, headers=user.headers)
    assert order(sort="updated_at", order="desc") == ["a", "b", "d", "c"]
    assert order(sort="updated_at", order="asc") == ["c", "d", "b", "a"]


def test_sort_ties_are_broken_by_id(client: TestClient, user: ApiUser) -> None:
    """Same title everywhere: the only stable order is the id."""
    made = [create_task(client, user, "same")["id"] for _ in range(4)]
    assert [t["id"] for t in list_all(client, user, sort="title")] == sorted(made, reverse=True)
    assert [t["id"] for t in list_all(client, user, sort="title", order="asc")] == sorted(made)


def test_pagination_with_total_and_next_link(client: TestClient, user: ApiUser) -> None:
    """Following rel="next" visits every task once, in order; the last page has no Link."""
    made = [create_task(client, user, f"t{i}")["id"] for i in range(5)]
    resp = client.get(user.url(), params={"limit": 2}, headers=user.headers)
    seen: list[int] = []
    pages = 0
    while True:
        assert resp.status_code == 200
        assert resp.headers["X-Total-Count"] == "5"
        seen += [t["id"] for t in resp.json()]
        pages += 1
        link = link_url(resp, "next")
        if link is None:
            break
        assert "limit=2" in link
        resp = client.get(link, headers=user.headers)
    assert pages == 3
    assert seen == sorted(made, reverse=True)

    exact = client.get(user.url(), params={"limit": 5}, headers=user.headers)
    assert len(exact.json()) == 5 and "Link" not in exact.headers
    beyond = client.get(user.url(), params={"offset": 10}, headers=user.headers)
    assert beyond.json() == [] and beyond.headers["X-Total-Count"] == "5"
    assert "Link" not in beyond.headers


def test_pagination_keeps_filters_in_next_link(client: TestClient, user: ApiUser) -> None:
    for i in range(3):
        create_task(client, user, f"match {i}")
    create_task(client, user, "other")
    resp = client.get(
        user.url(),
        params={"q": "match", "limit": 2, "sort": "title", "order": "asc"},
        headers=user.headers,
    )
    assert resp.headers["X-Total-Count"] == "3"
    link = link_url(resp, "next")
    assert link is not None
    last = client.get(link, headers=user.headers)
    assert titles(last.json()) == ["match 2"]
    assert link_url(last, "next") is None


def test_default_limit_is_100(client: TestClient, user: ApiUser, database: Database) -> None:
    """101 tasks (made through the service layer, in one transaction): a page of 100."""
    client.get(user.url(), headers=user.headers)  # provisions the user row
    with database.unit_of_work() as session:
        for i in range(101):
            rules.create_task(
                session,
                AuditContext(actor_id=user.user_id),
                user.user_id,
                TaskCreate(title=f"bulk {i}"),
            )
    resp = client.get(user.url(), headers=user.headers)
    assert len(resp.json()) == 100
    assert resp.headers["X-Total-Count"] == "101"
    link = link_url(resp, "next")
    assert link is not None and "after=" in link and "limit=100" in link
    rest = client.get(link, headers=user.headers)
    assert titles(rest.json()) == ["bulk 0"]
    big = client.get(user.url(), params={"limit": 500}, headers=user.headers)
    assert len(big.json()) == 101 and "Link" not in big.headers


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "query.limit"),
        ({"limit": 501}, "query.limit"),
        ({"limit": -1}, "query.limit"),
        ({"limit": "ten"}, "query.limit"),
        ({"offset": -1}, "query.offset"),
        ({"status": "done"}, "query.status"),
        ({"sort": "rank"}, "query.sort"),
        ({"sort": "id; DROP TABLE tasks"}, "query.sort"),
        ({"order": "sideways"}, "query.order"),
        ({"q": "x" * 201}, "query.q"),
    ],
)
def test_list_rejects_bad_parameters(
    client: TestClient, user: ApiUser, params: dict[str, Any], field: str
) -> None:
    assert_validation_error(client.get(user.url(), params=params, headers=user.headers), field)


def test_search_with_nul_is_400(client: TestClient, user: ApiUser) -> None:
    assert_problem(client.get(user.url(), params={"q": "a\x00b"}, headers=user.headers), 400)


# Update (PUT) -------------------------------------------------------------------------


def test_put_is_partial(client: TestClient, user: ApiUser) -> None:
    """Absent fields stay; description null clears it; created_at never moves."""
    task = create_task(client, user, "Write report", description="by Friday")
    url = user.url(f"/{task['id']}")

    done = client.put(url, json={"completed": True}, headers=user.headers).json()
    assert (done["title"], done["description"], done["completed"]) == (
        "Write report",
        "by Friday",
        True,
    )
    renamed = client.put(url, json={"title": "  Write the report "}, headers=user.headers).json()
    assert (renamed["title"], renamed["description"], renamed["completed"]) == (
        "Write the report",
        "by Friday",
        True,
    )
    cleared = client.put(url, json={"description": None}, headers=user.headers).json()
    assert cleared["description"] is None and cleared["title"] == "Write the report"
    everything = client.put(
        url, json={"title": "T", "description": "D", "completed": False}, headers=user.headers
    ).json()
    assert (everything["title"], everything["description"], everything["completed"]) == (
        "T",
        "D",
        False,
    )
    for version in (done, renamed, cleared, everything):
        assert version["created_at"] == task["created_at"]
    assert client.get(url, headers=user.headers).json() == everything


def test_updated_at_strictly_increases_on_every_change(client: TestClient, user: ApiUser) -> None:
    task = create_task(client, user, "tick")
    url = user.url(f"/{task['id']}")
    stamps = [ts(task["updated_at"])]
    for i in range(6):
        changed = client.put(url, json={"title": f"tick {i}"}, headers=user.headers).json()
        stamps.append(ts(changed["updated_at"]))
        toggled = client.patch(url + "/complete", headers=user.headers).json()
        stamps.append(ts(toggled["updated_at"]))
        assert changed["created_at"] == toggled["created_at"] == task["created_at"]
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        # Null where null is not allowed names the field (the README's field paths).
        ({"title": None}, "body.title"),
        ({"completed": None}, "body.completed"),
        ({"priority": None, "title": "ok"}, "body.priority"),
        ({"tags": None}, "body.tags"),
        ({"title": ""}, "body.title"),
        ({"title": "   "}, "body.title"),
        ({"title": "x" * 201}, "body.title"),
        ({"title": "a\x00"}, "body.title"),
        ({"description": "d" * 1001}, "body.description"),
        ({"completed": "maybe"}, "body.completed"),
        ({"id": 99}, "body.id"),
        ({"user_id": "other"}, "body.user_id"),
        ({"created_at": "2020-01-01T00:00:00Z"}, "body.created_at"),
        ({"title": "ok", "priority": 1}, "body.priority"),
        (None, "body"),
    ],
)
def test_put_rejects_invalid_bodies_and_changes_nothing(
    client: TestClient, user: ApiUser, body: Any, field: str
) -> None:
    task = create_task(client, user, "keep", description="as is")
    url = user.url(f"/{task['id']}")
    kwargs: dict[str, Any] = {"json": body} if body is not None else {}
    assert_validation_error(client.put(url, headers=user.headers, **kwargs), field)
    assert client.get(url, headers=user.headers).json() == task


# Delete -------------------------------------------------------------------------------


def test_delete_then_gone_for_every_method(client: TestClient, user: ApiUser) -> None:
    task = create_task(client, user, "temporary")
    url = user.url(f"/{task['id']}")
    resp = client.delete(url, headers=user.headers)
    assert resp.status_code == 204 and resp.content == b""
    assert_problem(client.get(url, headers=user.headers), 404)
    assert_problem(client.delete(url, headers=user.headers), 404)
    assert_problem(client.put(url, json={"title": "x"}, headers=user.headers), 404)
    assert_problem(client.patch(url + "/complete", headers=user.headers), 404)
    assert list_all(client, user) == []


# Complete (PATCH) ---------------------------------------------------------------------


def test_patch_without_body_toggles(client: TestClient, user: ApiUser) -> None:
    task = create_task(client, user)
    url = user.url(f"/{task['id']}/complete")
    assert client.patch(url, headers=user.headers).json()["completed"] is True
    assert client.patch(url, headers=user.headers).json()["completed"] is False
    empty_json = client.patch(
        url, content=b"", headers={**user.headers, "Content-Type": "application/json"}
    )
    assert empty_json.json()["completed"] is True


def test_patch_with_body_sets(client: TestClient, user: ApiUser) -> None:
    """Setting is idempotent: true twice stays true (and the second is not a change)."""
    task = create_task(client, user)
    url = user.url(f"/{task['id']}/complete")
    first = client.patch(url, json={"completed": True}, headers=user.headers)
    assert first.json()["completed"] is True
    again = client.patch(url, json={"completed": True}, headers=user.headers)
    assert again.json()["completed"] is True
    assert again.json()["updated_at"] == first.json()["updated_at"]
    assert again.headers["ETag"] == first.headers["ETag"]
    assert (
        client.patch(url, json={"completed": False}, headers=user.headers).json()["completed"]
        is False
    )


@pytest.mark.parametrize(
    "body", [{}, {"completed": None}, {"completed": "sure"}, {"completed": True, "x": 1}, [True]]
)
def test_patch_rejects_invalid_bodies(client: TestClient, user: ApiUser, body: Any) -> None:
    task = create_task(client, user)
    url = user.url(f"/{task['id']}")
    assert_validation_error(client.patch(url + "/complete", json=body, headers=user.headers))
    assert client.get(url, headers=user.headers).json()["completed"] is False


# ETag / If-Match ----------------------------------------------------------------------


def test_etag_on_every_task_response_and_changes_with_the_task(
    client: TestClient, user: ApiUser
) -> None:
    created = client.post(user.url(), json={"title": "tagged"}, headers=user.headers)
    url = user.url(f"/{created.json()['id']}")
    got = client.get(url, headers=user.headers)
    put = client.put(url, json={"title": "retagged"}, headers=user.headers)
    patched = client.patch(url + "/complete", headers=user.headers)
    tags = [r.headers["ETag"] for r in (created, got, put, patched)]
    assert all(re.fullmatch(r'"[^"]+"', tag) for tag in tags)
    assert tags[0] == tags[1]
    assert len({tags[1], tags[2], tags[3]}) == 3
    assert client.get(url, headers=user.headers).headers["ETag"] == tags[3]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "", {"title": "changed"}),
        ("PATCH", "/complete", None),
        ("PATCH", "/complete", {"completed": True}),
        ("DELETE", "", None),
    ],
)
def test_if_match(client: TestClient, user: ApiUser, method: str, path: str, body: Any) -> None:
    """A stale tag is 412 and changes nothing; the current tag (or none) goes through."""
    task = create_task(client, user, "original")
    url = user.url(f"/{task['id']}")
    stale = client.get(url, headers=user.headers).headers["ETag"]
    client.put(url, json={"description": "moved on"}, headers=user.headers)
    current = client.get(url, headers=user.headers)

    def send(if_match: str | None) -> httpx.Response:
        headers = dict(user.headers)
        if if_match is not None:
            headers["If-Match"] = if_match
        return client.request(method, url + path, json=body, headers=headers)

    assert_problem(send(stale), 412)
    after = client.get(url, headers=user.headers)
    assert after.json() == current.json() and after.headers["ETag"] == current.headers["ETag"]

    assert send(current.headers["ETag"]).status_code in (200, 204)
    if method != "DELETE":
        assert send(None).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "", {"title": "changed"}),
        ("PATCH", "/complete", None),
        ("DELETE", "", None),
    ],
)
def test_if_none_match_on_a_write(
    client: TestClient, user: ApiUser, method: str, path: str, body: Any
) -> None:
    """RFC 9110 13.1.2: a write whose `If-None-Match` lists the task's current tag, or `*`
    (the task exists), is 412 and changes nothing; a client sending `*` asked not to
    overwrite a task that is there. A tag no longer current lets it through. A missing task
    is 404 first, as with `If-Match`."""
    task = create_task(client, user, "original")
    url = user.url(f"/{task['id']}")
    stale = client.get(url, headers=user.headers).headers["ETag"]
    client.put(url, json={"description": "moved on"}, headers=user.headers)
    current = client.get(url, headers=user.headers)

    def send(*tags: str, task_url: str = url) -> httpx.Response:
        headers = [*user.headers.items(), *(("If-None-Match", tag) for tag in tags)]
        return client.request(method, task_url + path, json=body, headers=headers)

    for tags in (["*"], [current.headers["ETag"]], [f"W/{current.headers['ETag']}"]):
        assert_problem(send(*tags), 412)
        after = client.get(url, headers=user.headers)
        assert after.json() == current.json(), tags
        assert after.headers["ETag"] == current.headers["ETag"]
    assert_problem(send("*", task_url=user.url("/999999999")), 404)
    assert send(stale).status_code in (200, 204)


def test_if_match_on_missing_task_is_404(client: TestClient, user: ApiUser) -> None:
    headers = {**user.headers, "If-Match": '"1-1"'}
    assert_problem(client.put(user.url("/999999999"), json={"title": "x"}, headers=headers), 404)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("PUT", "", {"title": "changed"}), ("PATCH", "/complete", None), ("DELETE", "", None)],
)
def test_if_match_split_over_header_lines(
    client: TestClient, user: ApiUser, method: str, path: str, body: Any
) -> None:
    """RFC 9110 5.3: `If-Match: "a"` and `If-Match: "b"` on two lines are one list; the
    current tag on the second line goes through, a list of stale tags on both is 412."""
    task = create_task(client, user, "lines")
    url = user.url(f"/{task['id']}")
    current = client.get(url, headers=user.headers).headers["ETag"]

    def send(*tags: str) -> httpx.Response:
        headers = [*user.headers.items(), *(("If-Match", tag) for tag in tags)]
        return client.request(method, url + path, json=body, headers=headers)

    assert_problem(send('"0-1"', '"0-2", "0-3"'), 412)
    too_long = assert_problem(send(current, "x" * 257), 400)
    assert too_long["errors"][0]["field"] == "header.if-match"
    assert send('"0-1"', current).status_code in (200, 204)


def test_if_none_match_on_get_is_304_while_the_task_is_unchanged(
    client: TestClient, user: ApiUser, make_user: MakeUser
) -> None:
    """RFC 9110 13.1.2: a listed tag equal to the current one (weak comparison, on any header
    line) or `*` is 304 with the ETag and no body; a stale tag is the full 200. The token and
    the task are checked first: `*` matches only a task that exists for this user."""
    task = create_task(client, user, "cached")
    url = user.url(f"/{task['id']}")
    etag = client.get(url, headers=user.headers).headers["ETag"]

    def get(*tags: str, method: str = "GET") -> httpx.Response:
        headers = [*user.headers.items(), *(("If-None-Match", tag) for tag in tags)]
        return client.request(method, url, headers=headers)

    for tags in ([etag], [f"W/{etag}"], ['"0-0", ' + etag], ['"0-0"', etag], ["*"]):
        resp = get(*tags)
        assert (resp.status_code, resp.content, resp.headers["ETag"]) == (304, b"", etag), tags
        assert "Content-Type" not in resp.headers
    assert get(etag, method="HEAD").status_code == 304
    assert_problem(get(etag, "x" * 257), 400)
    star = {"If-None-Match": "*"}
    assert_problem(client.get(url, headers=star), 401)
    assert_problem(client.get(user.url("/999999999"), headers={**user.headers, **star}), 404)
    other = make_user()
    assert_problem(client.get(other.url(f"/{task['id']}"), headers={**other.headers, **star}), 404)

    client.put(url, json={"title": "changed"}, headers=user.headers)
    fresh = get(etag)
    assert fresh.status_code == 200 and fresh.json()["title"] == "changed"
    assert fresh.headers["ETag"] != etag
    assert get('"0-0"').status_code == 200


def test_head_answers_like_get_without_the_body(client: TestClient, user: ApiUser) -> None:
    """RFC 9110 9.3.2: the task, the list (paged) and an error answer HEAD with GET's status
    and headers, and no body; the token is checked as on GET."""
    task = create_task(client, user, "headed")
    create_task(client, user, "another")
    for path, params in (
        (f"/{task['id']}", {}),
        ("", {"limit": 1}),
        ("/999999999", {}),
    ):
        got = client.get(user.url(path), params=params, headers=user.headers)
        head = client.head(user.url(path), params=params, headers=user.headers)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        for name in ("ETag", "Link", "X-Total-Count", "Content-Type", "Content-Length"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    anonymous = client.head(user.url(f"/{task['id']}"))
    assert (anonymous.status_code, anonymous.content) == (401, b"")
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"


# Users table --------------------------------------------------------------------------


def _user_row(database: Database, user_id: str) -> tuple[Any, ...] | None:
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": user_id}
        ).first()
    return tuple(row) if row else None


def test_user_row_created_then_refreshed_from_claims(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    """First sight of a user creates the row; changed claims in a later token update it."""
    assert _user_row(database, user.user_id) is None
    first = create_dev_token(TEST_SECRET, user.user_id, email="first@example.com", name="First")
    assert client.get(user.url(), headers=bearer(first)).status_code == 200
    assert _user_row(database, user.user_id) == ("first@example.com", "First")

    second = create_dev_token(TEST_SECRET, user.user_id, email="second@example.com", name="2nd")
    assert client.get(user.url(), headers=bearer(second)).status_code == 200
    assert _user_row(database, user.user_id) == ("second@example.com", "2nd")


@pytest.mark.parametrize(
    ("email", "name"),
    [
        ("e" * 400 + "@example.com", "ok"),
        ("ok@example.com", "n" * 300),
        ("a\x00@b.c", "x\x00y"),
        # A lone surrogate: valid JSON ('\\ud800'), but no UTF-8 for PostgreSQL (it was a 500).
        ("\ud800@example.com", "Bob \ud83d"),
    ],
)
def test_unstorable_claims_do_not_break_requests(
    client: TestClient, make_user: MakeUser, database: Database, email: str, name: str
) -> None:
    """A valid token whose email/name the users table cannot hold is not a 500."""
    user = make_user(email=email, name=name)
    assert client.get(user.url(), headers=user.headers).status_code == 200
    row = _user_row(database, user.user_id)
    assert row is not None
    storable = len(email) <= 320 and "\x00" not in email and "\ud800" not in email
    assert (row[0] == email) == storable


# OpenAPI ------------------------------------------------------------------------------

EXPECTED_CODES = {
    ("/api/{user_id}/tasks", "get"): {"200", "400", "401", "403", "500", "503"},
    ("/api/{user_id}/tasks", "post"): {"201", "400", "401", "403", "413", "415", "500", "503"},
    ("/api/{user_id}/tasks/{task_id}", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/tasks/{task_id}", "put"): {
        "200",
        "400",
        "401",
        "403",
        "404",
        "412",
        "413",
        "415",
        "500",
        "503",
    },
    ("/api/{user_id}/tasks/{task_id}", "delete"): {
        "204",
        "400",
        "401",
        "403",
        "404",
        "412",
        "500",
        "503",
    },
    ("/api/{user_id}/tasks/{task_id}/complete", "patch"): {
        "200",
        "400",
        "401",
        "403",
        "404",
        "412",
        "413",
        "415",
        "500",
        "503",
    },
    ("/readyz", "get"): {"200", "503"},
    ("/healthz", "get"): {"200"},
}


def test_openapi_documents_responses_and_bearer_security(client: TestClient) -> None:
    """Every code a route can answer is documented (and 422, which it never sends, is not)."""
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    bearer_schemes = [
        name
        for name, scheme in schemes.items()
        if scheme["type"] == "http" and scheme["scheme"] == "bearer"
    ]
    assert len(bearer_schemes) == 1
    scheme_name = bearer_schemes[0]
    assert schemes[scheme_name].get("bearerFormat") == "JWT"

    for (path, method), codes in EXPECTED_CODES.items():
        operation = spec["paths"][path][method]
        documented = set(operation["responses"])
        assert codes <= documented, (path, method, codes - documented)
        assert "422" not in documented, (path, method)
        for code, response in operation["responses"].items():
            if code[0] in "45":
                content = response["content"]
                assert set(content) == {PROBLEM_JSON}, (path, method, code)
                assert content[PROBLEM_JSON]["schema"]["$ref"].endswith("/Problem")
        if path.startswith("/api/"):
            assert operation["security"] == [{scheme_name: []}]
        else:
            assert not operation.get("security")
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "errors"} <= set(problem["properties"])


# CORS ---------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"


@pytest.fixture
def cors_client(settings: Settings, database: Database) -> Any:
    app: FastAPI = create_app(settings.model_copy(update={"cors_origins": [ORIGIN]}), database)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _header_set(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def test_cors_preflight_allows_the_api_headers(cors_client: TestClient, user: ApiUser) -> None:
    wanted = [
        "Authorization",
        "Content-Type",
        "traceparent",
        "tracestate",
        "If-Match",
        "If-None-Match",
        "Idempotency-Key",
        "X-Request-ID",
    ]
    resp = cors_client.options(
        user.url("/1"),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": ", ".join(wanted),
        },
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert {h.lower() for h in wanted} <= _header_set(resp.headers["access-control-allow-headers"])
    assert "PUT" in resp.headers["access-control-allow-methods"]


def test_cors_preflight_allows_what_event_source_polyfills_send(
    cors_client: TestClient, user: ApiUser
) -> None:
    """EventSource polyfills (npm's `eventsource`, LaunchDarkly's) send `Cache-Control:
    no-cache` and the `Last-Event-ID` header: from another origin, a preflight that refused
    the first kept the stream from ever opening."""
    resp = cors_client.options(
        f"/api/{user.user_id}/events",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "cache-control, last-event-id",
        },
    )
    assert resp.status_code == 200, resp.text
    allowed = _header_set(resp.headers["access-control-allow-headers"])
    assert {"cache-control", "last-event-id"} <= allowed


def test_cors_preflight_allows_head(cors_client: TestClient, user: ApiUser) -> None:
    """A browser asks before a HEAD with a token."""
    resp = cors_client.options(
        user.url("/1"),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "Authorization",
        },
    )
    assert resp.status_code == 200, resp.text
    assert "head" in _header_set(resp.headers["access-control-allow-methods"])


def test_cors_exposes_response_headers(cors_client: TestClient, user: ApiUser) -> None:
    resp = cors_client.get(user.url(), headers={**user.headers, "Origin": ORIGIN})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    exposed = _header_set(resp.headers["access-control-expose-headers"])
    assert {"etag", "location", "x-request-id", "x-total-count", "link"} <= exposed


def test_cors_refuses_other_origins(cors_client: TestClient, user: ApiUser) -> None:
    resp = cors_client.options(
        user.url(),
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert resp.status_code == 400
    assert "access-control-allow-origin" not in resp.headers


def test_task_bodies_have_exactly_the_public_fields(client: TestClient, user: ApiUser) -> None:
    """Responses are dumped from the query's records: nothing internal (`version`) leaks."""
    public = {field.name for field in fields(TaskPublic)}
    created = client.post(user.url(), json={"title": "Fields"}, headers=user.headers)
    task_id = created.json()["id"]
    replay_headers = {**user.headers, "Idempotency-Key": "fields"}
    bodies = [
        created.json(),
        client.get(user.url(f"/{task_id}"), headers=user.headers).json(),
        client.get(user.url(), headers=user.headers).json()[0],
        client.put(user.url(f"/{task_id}"), json={"title": "F2"}, headers=user.headers).json(),
        client.patch(user.url(f"/{task_id}/complete"), headers=user.headers).json(),
        client.post(user.url(), json={"title": "K"}, headers=replay_headers).json(),
        client.post(user.url(), json={"title": "K"}, headers=replay_headers).json(),
    ]
    for body in bodies:
        assert set(body) == public


def test_total_count_follows_creates_and_deletes(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    """The running count behind X-Total-Count agrees with counting the rows, filters or not."""
    ids = [
        client.post(user.url(), json={"title": f"Count {n}"}, headers=user.headers).json()["id"]
        for n in range(7)
    ]
    for task_id in ids[:2]:
        assert client.delete(user.url(f"/{task_id}"), headers=user.headers).status_code == 204
    client.patch(user.url(f"/{ids[2]}/complete"), headers=user.headers)

    def total(**params: Any) -> str:
        resp = client.get(user.url(), params={"limit": 2, **params}, headers=user.headers)
        return resp.headers["X-Total-Count"]

    assert total() == "5"
    assert total(offset=4) == "5"
    assert total(status="pending") == "4"
    assert total(q="count") == "5"
    with database.engine.connect() as conn:
        stored, counted = conn.execute(
            sa.text(
                "SELECT task_count, (SELECT count(*) FROM tasks WHERE user_id = :u) "
                "FROM users WHERE id = :u"
            ),
            {"u": user.user_id},
        ).one()
    assert stored == counted == 5


def test_a_filter_that_filters_nothing_reads_the_page_with_its_total(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    """A `TaskFilter` whose statement has no condition (an empty `q`, which the route makes
    None but a caller of `queries.list_tasks` may pass) gets the unfiltered page, whose rows
    carry the user's running count: the records are read without it (a TypeError was a 500),
    and the total is that count."""
    from service.tasks.queries import TaskFilter, list_tasks

    for n in range(3):
        create_task(client, user, f"t{n}")
    with database.read_unit() as session:
        page = list_tasks(session, user.user_id, filters=TaskFilter(q=""), limit=2)
    assert [t.title for t in page.items] == ["t2", "t1"]
    assert (page.total, page.more) == (3, True)
