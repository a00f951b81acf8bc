"""GET /api/{user_id}/tasks/{id}/history, with and without ?as_of=."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient

from audit.chain import format_timestamp
from service.database import Database
from tests.audit_helpers import change, events_of
from tests.support import create_task


def history_url(user: Any, task_id: int) -> str:
    return f"/api/{user.user_id}/tasks/{task_id}/history"


def get_history(client: TestClient, user: Any, task_id: int, **params: Any) -> Any:
    return client.get(history_url(user, task_id), params=params, headers=user.headers)


def as_of(client: TestClient, user: Any, task_id: int, when: datetime) -> Any:
    return get_history(client, user, task_id, as_of=when.isoformat())


@pytest.fixture
def lived_task(client: TestClient, user: Any) -> tuple[int, list[dict[str, Any]]]:
    """A task created, renamed, completed, reopened and deleted; with its state at each step."""
    task = create_task(client, user, "Draft", "first words")
    states = [task]
    states.append(change(client, "PUT", f"/{task['id']}", user, json={"title": "Final"}))
    states.append(change(client, "PATCH", f"/{task['id']}/complete", user))
    states.append(change(client, "PATCH", f"/{task['id']}/complete", user))
    change(client, "DELETE", f"/{task['id']}", user)
    return task["id"], states


def test_history_of_a_deleted_task(
    client: TestClient, user: Any, database: Database, lived_task: tuple[int, list[Any]]
) -> None:
    task_id, states = lived_task
    assert client.get(user.url(f"/{task_id}"), headers=user.headers).status_code == 404
    response = get_history(client, user, task_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task_id"] == task_id and body["next_cursor"] is None
    assert [e["action"] for e in body["items"]] == [
        "task.created",
        "task.updated",
        "task.completed",
        "task.reopened",
        "task.deleted",
    ]
    assert [e["seq"] for e in body["items"]] == [1, 2, 3, 4, 5]
    assert [e["after"]["title"] for e in body["items"][:-1]] == [s["title"] for s in states]
    assert body["items"][-1]["after"] is None
    assert body["items"][-1]["before"]["title"] == "Final"
    stored = events_of(database.engine, user.user_id)
    assert [e["hash"] for e in body["items"]] == [e["hash"] for e in stored]


def test_history_holds_only_that_task_and_pages_oldest_first(client: TestClient, user: Any) -> None:
    one = create_task(client, user, "One")
    other = create_task(client, user, "Other")
    for n in range(4):
        change(client, "PUT", f"/{one['id']}", user, json={"title": f"One {n}"})
        change(client, "PUT", f"/{other['id']}", user, json={"title": f"Other {n}"})
    seqs: list[int] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        response = get_history(client, user, one["id"], **params)
        assert response.status_code == 200
        page = response.json()
        assert len(page["items"]) <= 2
        seqs.extend(e["seq"] for e in page["items"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seqs == [1, 3, 5, 7, 9]
    assert get_history(client, user, other["id"]).json()["items"][0]["seq"] == 2


def test_history_404_for_tasks_never_had(client: TestClient, make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    task = create_task(client, alice, "Alice's")
    for response in (
        get_history(client, bob, task["id"]),  # someone else's task
        get_history(client, bob, task["id"], as_of="2100-01-01T00:00:00Z"),
        get_history(client, alice, 2**63 - 1),  # never existed
    ):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    assert get_history(client, alice, task["id"]).status_code == 200
    assert client.get(history_url(alice, task["id"]), headers=bob.headers).status_code == 403


def test_as_of_rebuilds_the_task_at_each_time(
    client: TestClient, user: Any, database: Database, lived_task: tuple[int, list[Any]]
) -> None:
    task_id, states = lived_task
    times = [e["occurred_at"] for e in events_of(database.engine, user.user_id)]
    micro = timedelta(microseconds=1)

    # Before it was created: 404.
    response = as_of(client, user, task_id, times[0] - micro)
    assert response.status_code == 404
    assert "did not exist yet" in response.json()["detail"]

    for n, state in enumerate(states):
        # At the event itself, and just before the next one: the state that event left.
        for when in (times[n], times[n + 1] - micro, times[n] + (times[n + 1] - times[n]) / 2):
            response = as_of(client, user, task_id, when)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["task_id"] == task_id
            assert body["event_seq"] == n + 1
            assert body["event_occurred_at"] == format_timestamp(times[n])
            assert body["as_of"] == format_timestamp(when)
            task = body["task"]
            for key in ("created_at", "updated_at"):
                assert datetime.fromisoformat(task[key]) == datetime.fromisoformat(state[key])
            for key in ("id", "user_id", "title", "description", "completed"):
                assert task[key] == state[key]
            assert set(task) == set(state)

    # Once deleted: 404, also long after.
    for when in (times[4], times[4] + timedelta(days=365)):
        response = as_of(client, user, task_id, when)
        assert response.status_code == 404
        assert "deleted" in response.json()["detail"]


def test_as_of_accepts_any_zone_and_a_live_task(client: TestClient, user: Any) -> None:
    task = create_task(client, user, "Alive")
    later = datetime.now(timezone(timedelta(hours=-7))) + timedelta(days=1)
    response = as_of(client, user, task["id"], later)
    assert response.status_code == 200
    assert response.json()["task"]["title"] == "Alive"


@pytest.mark.parametrize(
    "params",
    [
        {"as_of": "2026-01-01T00:00:00"},  # no time zone
        {"as_of": "not a time"},
        {"as_of": "9999-12-31T23:59:59-12:00"},  # no UTC equivalent
        {"as_of": "0001-01-01T00:00:00+01:00"},
        {"as_of": ""},
        {"as_of": "2026-01-01T00:00:00Z", "cursor": "aC4x"},
        {"limit": 0},
        {"limit": 501},
        {"cursor": "zz"},
    ],
)
def test_bad_history_parameters_are_400(
    client: TestClient, user: Any, params: dict[str, Any]
) -> None:
    task = create_task(client, user, "Param")
    response = get_history(client, user, task["id"], **params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_history_route_leaves_task_routes_alone(client: TestClient, user: Any) -> None:
    task = create_task(client, user, "Routes")
    assert client.get(user.url(f"/{task['id']}"), headers=user.headers).json() == task
    path = history_url(user, task["id"])
    assert client.post(path, json={}, headers=user.headers).status_code == 405
    assert client.get(user.url("/history"), headers=user.headers).status_code == 400
