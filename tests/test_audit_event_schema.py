"""Every kind of audit event, as the API serves it, is what /openapi.json says, with no field
the document leaves out: a client generated from it reads real events, reminders included."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import pytest

from audit.schemas import AuditAction
from service.app import create_app
from service.database import Database
from service.settings import Settings
from tests.reminder_helpers import at, wait_fired
from tests.support import ApiUser, LiveServer, create_task


@pytest.fixture
def http(settings: Settings, database: Database) -> Iterator[httpx.Client]:
    """The app over a real socket with its reminder worker polling (reminders fire)."""
    app = create_app(
        settings.model_copy(update={"reminders_enabled": True, "reminder_poll_seconds": 0.1}),
        database,
    )
    with LiveServer(app) as server, server.client() as client:
        yield client


def _closed(document: dict[str, Any]) -> dict[str, Any]:
    """The document's schemas with `additionalProperties: false` on every object that lists
    its properties and says nothing of others: a field the document does not name fails."""
    schemas = copy.deepcopy(document["components"]["schemas"])
    for schema in schemas.values():
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    return {"components": {"schemas": schemas}}


def _response_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["paths"][path]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    return schema


def _write(http: httpx.Client, method: str, url: str, user: ApiUser, **kwargs: Any) -> Any:
    resp = http.request(method, url, headers=user.headers, **kwargs)
    assert resp.status_code in (200, 204), resp.text
    return resp.json() if resp.status_code == 200 else None


def _all_events(http: httpx.Client, user: ApiUser) -> list[dict[str, Any]]:
    """Every page of the user's audit events, as served."""
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 500}
    while True:
        resp = http.get(f"/api/{user.user_id}/audit-events", params=params, headers=user.headers)
        assert resp.status_code == 200, resp.text
        pages.append(resp.json())
        if pages[-1]["next_cursor"] is None:
            return pages
        params["cursor"] = pages[-1]["next_cursor"]


def test_every_kind_of_event_matches_the_documented_schema_closed(
    http: httpx.Client, user: ApiUser
) -> None:
    # A recurring task with tags and a reminder due soon: created, fired, updated, completed
    # (which creates the next occurrence), reopened, deleted.
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    task = create_task(
        http,
        user,
        title="Water the plants",
        priority="high",
        due_at=due.isoformat(),
        tags=["home"],
        recurrence="FREQ=WEEKLY;COUNT=3",
        remind_at=at(0.5),
    )
    # A reminder set in the past fires late.
    late = create_task(http, user, title="Call back", remind_at=at(-3600))
    fired = wait_fired(http, user, task["id"]) + wait_fired(http, user, late["id"])
    assert sorted(e["after"]["reminder"]["late"] for e in fired) == [False, True]

    url = user.url(f"/{task['id']}")
    _write(http, "PUT", url, user, json={"description": "Twice a week in summer"})
    completed = _write(http, "PATCH", f"{url}/complete", user, json={"completed": True})
    assert completed["next_task_id"] is not None
    _write(http, "PATCH", f"{url}/complete", user, json={"completed": False})
    # A tag's rename and removal are updates of the tasks that carry it.
    tags = http.get(f"/api/{user.user_id}/tags", headers=user.headers).json()
    (home,) = [t["id"] for t in tags if t["name"] == "home"]
    _write(http, "PATCH", f"/api/{user.user_id}/tags/{home}", user, json={"name": "house"})
    _write(http, "DELETE", f"/api/{user.user_id}/tags/{home}", user)
    _write(http, "DELETE", url, user)

    document = http.get("/openapi.json").json()
    closed = _closed(document)
    page_schema = {**_response_schema(document, "/api/{user_id}/audit-events"), **closed}
    validator = jsonschema.Draft202012Validator(
        page_schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    pages = _all_events(http, user)
    for page in pages:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(page)]
        assert errors == []
    events = [event for page in pages for event in page["items"]]
    assert {e["action"] for e in events} == {a.value for a in AuditAction}
    assert any(e["action"] == "task.created" and e["caused_by_seq"] for e in events)
    assert sum("reminder" in (e["after"] or {}) for e in events) == 2
    # One by one too, so a failure names the event.
    event_schema = {"$ref": "#/components/schemas/AuditEventPublic", **closed}
    for event in events:
        jsonschema.validate(event, event_schema, cls=jsonschema.Draft202012Validator)
