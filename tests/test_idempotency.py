"""Idempotency-Key on POST: a retried create returns the first response instead of a copy.

Scoped to the user, kept at least 24 hours (expiry is tested by backdating the key's row),
safe under concurrent duplicates (over a real socket), and never a second task or event.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.database import Database
from service.sqltypes import utcnow
from service.tasks.idempotency import KEY_MAX
from tests.reliability_helpers import live, tracked_app, wait_until
from tests.support import (
    ApiUser,
    LiveServer,
    MakeUser,
    assert_problem,
    assert_validation_error,
    list_all,
)


def post(
    client: TestClient | httpx.Client, user: ApiUser, body: Any, key: str | None
) -> httpx.Response:
    headers = dict(user.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(user.url(), json=body, headers=headers)


def created_events(database: Database, user_id: str) -> list[str]:
    """The entity ids of the user's task.created events."""
    with database.engine.connect() as conn:
        query = sa.text(
            "SELECT entity_id FROM audit_events WHERE user_id = :u AND action = 'task.created' "
            "ORDER BY seq"
        )
        return list(conn.execute(query, {"u": user_id}).scalars())


def backdate(database: Database, user_id: str, key: str, age: timedelta) -> None:
    with database.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE idempotency_keys SET created_at = :t WHERE user_id = :u AND key = :k"),
            {"t": utcnow() - age, "u": user_id, "k": key},
        )


def test_retry_with_the_same_key_and_body_replays_the_first_response(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    key = uuid.uuid4().hex
    first = post(client, user, {"title": "once", "description": "d"}, key)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    for _ in range(3):
        again = post(client, user, {"title": "once", "description": "d"}, key)
        assert again.status_code == 201
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content  # byte for byte: the fields in their order
        for header in ("Location", "ETag", "Content-Type"):
            assert again.headers[header] == first.headers[header]
    assert [t["id"] for t in list_all(client, user)] == [first.json()["id"]]
    assert created_events(database, user.user_id) == [str(first.json()["id"])]


def test_the_same_body_spelled_differently_is_the_same_request(
    client: TestClient, user: ApiUser
) -> None:
    """The body is compared as JSON, not as bytes: key order and spacing do not matter."""
    key = uuid.uuid4().hex
    headers = {**user.headers, "Idempotency-Key": key, "Content-Type": "application/json"}
    first = client.post(user.url(), content=b'{"title":"a","description":"b"}', headers=headers)
    again = client.post(
        user.url(), content=b'{ "description": "b",\n  "title": "a" }', headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert len(list_all(client, user)) == 1


@pytest.mark.parametrize(
    "other",
    [
        {"title": "other"},
        {"title": "once", "description": "d"},
        {"title": "once", "description": None},
    ],
)
def test_the_same_key_with_another_body_is_409(
    client: TestClient, user: ApiUser, database: Database, other: dict[str, Any]
) -> None:
    key = uuid.uuid4().hex
    first = post(client, user, {"title": "once"}, key)
    assert first.status_code == 201
    if other == {"title": "once", "description": None}:
        # An explicit null is the default: the same request as leaving it out.
        assert post(client, user, other, key).json()["id"] == first.json()["id"]
    else:
        assert_problem(post(client, user, other, key), 409)
    assert [t["id"] for t in list_all(client, user)] == [first.json()["id"]]
    assert created_events(database, user.user_id) == [str(first.json()["id"])]


def test_keys_are_scoped_to_the_user(client: TestClient, make_user: MakeUser) -> None:
    """Another user's key is not a replay, nor a conflict: two users, one key, two tasks."""
    alice, bob = make_user(), make_user()
    key = uuid.uuid4().hex
    a = post(client, alice, {"title": "same"}, key)
    b = post(client, bob, {"title": "same"}, key)
    assert a.status_code == b.status_code == 201
    assert "Idempotent-Replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]
    assert b.json()["user_id"] == bob.user_id
    c = post(client, bob, {"title": "different"}, key)
    assert_problem(c, 409)  # bob's own earlier use of the key
    assert [t["id"] for t in list_all(client, alice)] == [a.json()["id"]]
    assert [t["id"] for t in list_all(client, bob)] == [b.json()["id"]]


def test_without_a_key_every_post_creates(client: TestClient, user: ApiUser) -> None:
    for _ in range(2):
        assert post(client, user, {"title": "dup"}, None).status_code == 201
    assert len(list_all(client, user)) == 2


def test_replay_is_the_original_response_even_after_the_task_changed(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    key = uuid.uuid4().hex
    first = post(client, user, {"title": "orig"}, key).json()
    url = user.url(f"/{first['id']}")
    assert client.put(url, json={"title": "renamed"}, headers=user.headers).status_code == 200
    assert post(client, user, {"title": "orig"}, key).json() == first
    assert client.delete(url, headers=user.headers).status_code == 204
    replay = post(client, user, {"title": "orig"}, key)
    assert replay.status_code == 201 and replay.json() == first
    assert list_all(client, user) == []  # not re-created
    assert created_events(database, user.user_id) == [str(first["id"])]


def test_keys_are_kept_24_hours_then_may_be_reused(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    key = uuid.uuid4().hex
    first = post(client, user, {"title": "day one"}, key).json()

    backdate(database, user.user_id, key, timedelta(hours=23, minutes=59))
    assert post(client, user, {"title": "day one"}, key).json() == first
    assert_problem(post(client, user, {"title": "other"}, key), 409)

    backdate(database, user.user_id, key, timedelta(hours=24, minutes=1))
    fresh = post(client, user, {"title": "other"}, key)  # expired: a new request, not a 409
    assert fresh.status_code == 201 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["id"] != first["id"]
    # The key now stands for the new request, for another 24 hours.
    assert post(client, user, {"title": "other"}, key).json() == fresh.json()
    assert_problem(post(client, user, {"title": "day one"}, key), 409)
    assert sorted(t["id"] for t in list_all(client, user)) == sorted(
        [first["id"], fresh.json()["id"]]
    )
    assert len(created_events(database, user.user_id)) == 2


@pytest.mark.parametrize(
    "key",
    [b"", b"x" * (KEY_MAX + 1), "caf\u00e9".encode("latin-1"), b"tab\there", b"\x7f"],
    ids=["empty", "too-long", "non-ascii", "control", "del"],
)
def test_malformed_keys_are_400_and_create_nothing(
    client: TestClient, user: ApiUser, key: bytes
) -> None:
    resp = client.post(
        user.url(),
        json={"title": "x"},
        headers=[*user.headers.items(), ("Idempotency-Key", key)],  # type: ignore[list-item]
    )
    assert_validation_error(resp)
    assert list_all(client, user) == []


def test_two_key_lines_are_400_and_create_nothing(client: TestClient, user: ApiUser) -> None:
    """Either key alone would later replay or create: neither is taken silently."""
    resp = client.post(
        user.url(),
        json={"title": "x"},
        headers=[*user.headers.items(), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")],
    )
    assert_validation_error(resp, "header.idempotency-key")
    assert list_all(client, user) == []
    assert post(client, user, {"title": "x"}, "k1").status_code == 201
    assert post(client, user, {"title": "x"}, "k2").status_code == 201
    assert len(list_all(client, user)) == 2


def test_longest_key_is_accepted(client: TestClient, user: ApiUser) -> None:
    key = "k" * KEY_MAX
    first = post(client, user, {"title": "x"}, key)
    assert first.status_code == 201
    assert post(client, user, {"title": "x"}, key).json()["id"] == first.json()["id"]


# Concurrent duplicates, over a real socket ----------------------------------------------


def _together(
    server: LiveServer, count: int, send: Callable[[httpx.Client, int], Any]
) -> list[Any]:
    barrier = threading.Barrier(count)

    def one(index: int) -> Any:
        with server.client() as http:
            http.get("/healthz")  # connected before the barrier, so the requests overlap
            barrier.wait(timeout=30)
            return send(http, index)

    with ThreadPoolExecutor(count) as executor:
        return list(executor.map(one, range(count)))


def test_concurrent_duplicates_create_exactly_one_task(
    live_server: LiveServer, user: ApiUser, database: Database
) -> None:
    for round_ in range(3):
        key = uuid.uuid4().hex
        body = {"title": f"round {round_}"}
        results = _together(
            live_server, 12, lambda http, _, body=body, key=key: post(http, user, body, key)
        )
        assert [r.status_code for r in results] == [201] * 12
        assert len({r.json()["id"] for r in results}) == 1
        assert sum("Idempotent-Replayed" not in r.headers for r in results) == 1
    with live_server.client() as http:
        tasks = http.get(user.url(), headers=user.headers).json()
    assert len(tasks) == 3
    assert sorted(created_events(database, user.user_id)) == sorted(str(t["id"]) for t in tasks)


def test_concurrent_uses_with_different_bodies_create_one_task_and_409_the_rest(
    live_server: LiveServer, user: ApiUser, database: Database
) -> None:
    key = uuid.uuid4().hex
    results = _together(
        live_server, 8, lambda http, index: post(http, user, {"title": f"body {index % 2}"}, key)
    )
    winners = [r for r in results if r.status_code == 201]
    assert {r.json()["id"] for r in winners} == {winners[0].json()["id"]}
    winning_title = winners[0].json()["title"]
    for index, resp in enumerate(results):
        if f"body {index % 2}" == winning_title:
            assert resp.status_code == 201  # the same body: a replay of the winner
        else:
            assert_problem(resp, 409)
    assert len(created_events(database, user.user_id)) == 1


def test_an_expired_key_reclaimed_concurrently_is_not_a_500(
    settings: Any, user: ApiUser, database: Database
) -> None:
    """A request waiting on an expired key's row while another transaction replaces that row
    (an expired key being reused) finds the row gone: it must look again, not fail."""
    key = uuid.uuid4().hex
    admin = database.engine
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        first = post(http, user, {"title": "old"}, key).json()
        backdate(database, user.user_id, key, timedelta(days=2))
        holder = admin.connect()
        try:
            holder.execute(
                sa.text(
                    "SELECT 1 FROM idempotency_keys WHERE user_id = :u AND key = :k FOR UPDATE"
                ),
                {"u": user.user_id, "k": key},
            )
            with ThreadPoolExecutor(1) as executor:
                pending = executor.submit(post, http, user, {"title": "old"}, key)
                wait_until(lambda: tracked.waiting_pids(admin), "the request to wait for the key")
                # Meanwhile another request reclaimed the expired key, for another body.
                holder.execute(
                    sa.text("DELETE FROM idempotency_keys WHERE user_id = :u AND key = :k"),
                    {"u": user.user_id, "k": key},
                )
                holder.execute(
                    sa.text(
                        "INSERT INTO idempotency_keys "
                        "(user_id, key, request_hash, status_code, response_body, created_at) "
                        "VALUES (:u, :k, :h, 201, CAST(:b AS jsonb), now())"
                    ),
                    {"u": user.user_id, "k": key, "h": "0" * 64, "b": json.dumps(first)},
                )
                holder.commit()
                resp = pending.result(timeout=60)
        finally:
            holder.close()
        assert_problem(resp, 409)  # the key now belongs to another body
        assert [t["id"] for t in http.get(user.url(), headers=user.headers).json()] == [first["id"]]
