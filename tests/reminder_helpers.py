"""Reminders through the API: times, and the `reminder.fired` events of a task (no tests here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.reliability_helpers import wait_until
from tests.support import ApiUser


def at(seconds: float) -> str:
    """RFC 3339 (with an offset) for now + `seconds`."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def fired_events(
    http: httpx.Client | TestClient, user: ApiUser, task_id: int | None = None
) -> list[dict[str, Any]]:
    """The user's `reminder.fired` events (of one task), oldest first, from the audit feed."""
    params: dict[str, Any] = {"action": "reminder.fired", "limit": 500}
    if task_id is not None:
        params["task_id"] = task_id
    resp = http.get(f"/api/{user.user_id}/audit-events", params=params, headers=user.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["next_cursor"] is None
    return list(reversed(body["items"]))


def wait_fired(
    http: httpx.Client | TestClient,
    user: ApiUser,
    task_id: int,
    count: int = 1,
    timeout: float = 30,
) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = wait_until(
        lambda: (events := fired_events(http, user, task_id)) and len(events) >= count and events,
        f"{count} reminder.fired event(s) of task {task_id}",
        timeout,
    )
    return result


def reminders(
    http: httpx.Client | TestClient, user: ApiUser, **params: Any
) -> list[dict[str, Any]]:
    resp = http.get(f"/api/{user.user_id}/reminders", params=params, headers=user.headers)
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()
    return items


def verify(http: httpx.Client | TestClient, user: ApiUser) -> dict[str, Any]:
    resp = http.get(
        f"/api/{user.user_id}/audit-events/verify", params={"full": "true"}, headers=user.headers
    )
    assert resp.status_code == 200, resp.text
    report: dict[str, Any] = resp.json()
    return report
