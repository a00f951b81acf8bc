"""Query strings over HTTP: a parameter the endpoint does not declare (a typo such as
`?stauts=open`) and a scalar parameter given twice (`?limit=1&limit=2`) are 400 naming it, on
every `/api/` route, after the token is checked, and with the query's other errors."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from fastapi import FastAPI
from fastapi.dependencies.utils import get_flat_params
from fastapi.params import Query
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.querystring import KnownQueryRoute
from service.routing import every_route
from tests.feed_helpers import FeedReader
from tests.support import ApiUser, LiveServer, assert_problem, assert_validation_error, create_task

UNKNOWN = "stauts"


def _api_operations(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    found = []
    for route in every_route(app.routes):
        if isinstance(route, APIRoute) and route.path.startswith("/api/"):
            found += [(method, route.path, route) for method in sorted(route.methods)]
    return found


def _url(path: str, user: ApiUser, query: str) -> str:
    return path.format(user_id=user.user_id, task_id=1, tag_id=1) + f"?{query}"


def test_every_api_route_refuses_an_unknown_parameter_after_the_token(
    app: FastAPI, client: TestClient, make_user: Any
) -> None:
    operations = _api_operations(app)
    # Every kind: tasks, tags, reminders, audit, the feed and its tickets, HEAD twins.
    paths = {path for _, path, _ in operations}
    for suffix in ("/tasks", "/tags", "/reminders", "/audit-events", "/events", "/tickets"):
        assert any(path.endswith(suffix) for path in paths), suffix
    assert any(method == "HEAD" for method, _, _ in operations)
    for method, path, route in operations:
        assert isinstance(route, KnownQueryRoute), path
        user = make_user()
        url = _url(path, user, f"{UNKNOWN}=open")
        resp = client.request(method, url, headers=user.headers)
        assert resp.status_code == 400, (method, path, resp.text)
        if method != "HEAD":
            body = assert_validation_error(resp, f"query.{UNKNOWN}")
            (error,) = [e for e in body["errors"] if e["field"] == f"query.{UNKNOWN}"]
            assert error["message"].startswith("unknown parameter; this endpoint takes "), error
        if path.endswith("/events"):
            continue  # checks its token (or ticket) in the endpoint, after the query: below
        # No token, a bad one, another user's: as without the stray parameter.
        no_token = client.request(method, url)
        assert no_token.status_code == 401, (method, path, no_token.text)
        assert no_token.headers["www-authenticate"] == "Bearer"
        bad = client.request(method, url, headers={"Authorization": "Bearer not.a.jwt"})
        assert bad.status_code == 401, (method, path, bad.text)
        other = make_user()
        assert client.request(method, url, headers=other.headers).status_code == 403


def test_a_refused_request_changes_nothing(client: TestClient, user: ApiUser) -> None:
    resp = client.post(user.url(f"?{UNKNOWN}=x"), json={"title": "t"}, headers=user.headers)
    assert_validation_error(resp, f"query.{UNKNOWN}")
    task = create_task(client, user, "kept")
    resp = client.delete(user.url(f"/{task['id']}?force=1"), headers=user.headers)
    assert_validation_error(resp, "query.force")
    listed = client.get(user.url(), headers=user.headers)
    assert [t["title"] for t in listed.json()] == ["kept"]
    history = client.get(f"/api/{user.user_id}/audit-events", headers=user.headers).json()
    assert [e["action"] for e in history["items"]] == ["task.created"]


def test_the_query_is_reported_whole_with_the_other_errors(
    client: TestClient, user: ApiUser
) -> None:
    resp = client.get(user.url(f"?{UNKNOWN}=open&limit=0&sort=zz&prio=high"), headers=user.headers)
    body = assert_validation_error(
        resp, f"query.{UNKNOWN}", "query.prio", "query.limit", "query.sort"
    )
    assert len(body["errors"]) == 4
    (error,) = [e for e in body["errors"] if e["field"] == "query.prio"]
    assert "priority" in error["message"] and "status" in error["message"]
    # With a body that is wrong too.
    resp = client.post(user.url(f"?{UNKNOWN}=1"), json={"title": ""}, headers=user.headers)
    assert_validation_error(resp, f"query.{UNKNOWN}", "body.title")
    # An invalid {user_id} (with a valid token: without one it is a 401), with the name.
    resp = client.get(f"/api/{'a' * 129}/tasks?{UNKNOWN}=1", headers=user.headers)
    assert_validation_error(resp, "path.user_id", f"query.{UNKNOWN}")
    assert_problem(client.get(f"/api/{'a' * 129}/tasks?{UNKNOWN}=1"), 401)


def test_a_scalar_parameter_given_twice_is_refused_a_repeatable_one_is_not(
    client: TestClient, user: ApiUser
) -> None:
    create_task(client, user, "t", priority="high", tags=["a", "b"])
    for query in ("limit=1&limit=2", "status=pending&status=completed", "q=a&q=b"):
        name = query.split("=")[0]
        body = assert_validation_error(client.get(user.url(f"?{query}"), headers=user.headers))
        assert body["errors"] == [
            {"field": f"query.{name}", "message": "given more than once; it takes one value"}
        ]
    resp = client.get(user.url("?priority=high&priority=low&tag=a&tag=B"), headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert [t["title"] for t in resp.json()] == ["t"]
    resp = client.get(f"/api/{user.user_id}/audit-events?limit=1&limit=1", headers=user.headers)
    assert_validation_error(resp, "query.limit")


def test_every_documented_parameter_is_still_accepted(client: TestClient, user: ApiUser) -> None:
    for n in range(3):
        create_task(client, user, f"t{n}", due_at="2030-01-01T00:00:00Z")
    query = (
        "status=pending&priority=none&due_before=2031-01-01T00:00:00Z"
        "&due_after=2029-01-01T00:00:00Z&overdue=false&q=t&sort=title&order=asc&limit=2"
    )
    first = client.get(user.url(f"?{query}"), headers=user.headers)
    assert first.status_code == 200, first.text
    # The next link carries `after=`: accepted too.
    link = first.headers["link"].split(";")[0].strip("<>")
    rest = client.get(link, headers=user.headers)
    assert rest.status_code == 200, rest.text
    assert [t["title"] for t in first.json() + rest.json()] == ["t0", "t1", "t2"]
    base = f"/api/{user.user_id}"
    for url in (
        f"{base}/tasks?offset=1&limit=1",
        f"{base}/reminders?state=pending&limit=5&offset=0",
        f"{base}/audit-events?limit=5&action=task.created&since=2020-01-01T00:00:00Z",
        f"{base}/audit-events/verify?full=true",
        # A blank value and a name without one are the parameter, given (as FastAPI reads it).
        f"{base}/tasks?q=",
        f"{base}/tasks?q",
        # An empty query string is no parameter at all.
        f"{base}/tasks?",
        f"{base}/tasks?&",
    ):
        assert client.get(url, headers=user.headers).status_code == 200, url


def test_a_name_too_long_to_repeat_or_empty_is_refused_without_it(
    client: TestClient, user: ApiUser
) -> None:
    for query, what in (
        ("x" * 65 + "=1", "a name over 64 characters"),
        ("=1", "no name"),
        ("a%00b=1", "control characters in its name"),
        ("%C2%85=1", "control characters in its name"),
    ):
        body = assert_validation_error(client.get(user.url(f"?{query}"), headers=user.headers))
        assert [e["field"] for e in body["errors"]] == ["query"]
        assert body["errors"][0]["message"].startswith(f"a parameter with {what}: unknown")
    resp = client.get(user.url("?" + "x" * 64 + "=1"), headers=user.headers)
    assert_validation_error(resp, "query." + "x" * 64)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_the_endpoints_outside_the_api_ignore_query_parameters(
    client: TestClient, path: str
) -> None:
    """Uptime monitors and browsers add cache busters (`?_=1700000000`)."""
    assert client.get(f"{path}?_=1&_=2").status_code == 200


def test_the_change_feed_refuses_a_stray_parameter_before_spending_its_ticket(
    live_server: LiveServer, user: ApiUser
) -> None:
    """The feed redeems its ticket in the endpoint, after the query: a refused request must
    not spend the single-use ticket. Without a ticket the token comes first, as elsewhere."""
    with live_server.client() as http:
        resp = http.get(f"/api/{user.user_id}/events?after=-1&{UNKNOWN}=1")
        assert_problem(resp, 401)
        resp = http.get(f"/api/{user.user_id}/events?after=-1&{UNKNOWN}=1", headers=user.headers)
        assert_validation_error(resp, "query.after", f"query.{UNKNOWN}")
        ticket = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()
        url = ticket["stream_url"]
        assert_validation_error(http.get(f"{url}&{UNKNOWN}=1"), f"query.{UNKNOWN}")
        assert_validation_error(http.get(f"{url}&ticket=again"), "query.ticket")
        with FeedReader(live_server.url, url) as reader:
            assert reader.status == 200


def test_unknown_parameters_are_problem_json_with_the_request_id(
    client: TestClient, user: ApiUser
) -> None:
    resp = client.get(user.url(f"?{UNKNOWN}=1"), headers={**user.headers, "X-Request-ID": "r-1"})
    assert_problem(resp, 400)
    assert resp.headers["x-request-id"] == "r-1"


def test_every_api_operation_documents_the_400_for_unknown_parameters(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            described = operation["responses"].get("400", {}).get("description", "")
            if path.startswith("/api/"):
                assert "query parameter this operation does not list" in described, (method, path)
            else:
                assert "query parameter" not in described, (method, path)


def _integer_parameters(route: APIRoute) -> list[str]:
    """The names of the route's query parameters read as integers (`int`, `int | None`)."""
    found = []
    for field in get_flat_params(route.dependant):
        annotation = field.field_info.annotation
        # An `Annotated[int, ...]` in a union is itself: its `__origin__` is `int`.
        types = {getattr(t, "__origin__", t) for t in (annotation, *get_args(annotation))}
        if isinstance(field.field_info, Query) and int in types:
            found.append(field.alias)
    return found


def test_every_integer_parameter_takes_plain_digits_only(
    app: FastAPI, client: TestClient, user: ApiUser
) -> None:
    """`+1`, ` 1`, `1_0`, `1.0` and `01` are numbers to int() (pydantic reads them so), not to
    a cache, a proxy or a log: `?limit=1_0` served 10 tasks. 400 naming the parameter, as
    a path id written so is (`service.deps.digits_only`); on every `/api/` route."""
    checked = set()
    for method, path, route in _api_operations(app):
        for name in _integer_parameters(route):
            checked.add(name)
            for value in ("%2B1", "%201", "1%20", "1_0", "1.0", "01"):
                # No `Accept: text/event-stream`: the change feed answers 406, not a stream.
                resp = client.request(
                    method, _url(path, user, f"{name}={value}"), headers=user.headers
                )
                assert resp.status_code == 400, (method, path, name, value, resp.text)
                if method != "HEAD":
                    body = assert_validation_error(resp, f"query.{name}")
                    assert body["errors"][0]["message"] == (
                        "must be a whole number: digits, without a sign or leading zeros"
                    ), body
    assert checked == {"limit", "offset", "task_id", "after"}
    # The OpenAPI document still gives their bounds, as `minimum` and `maximum`.
    for item in client.get("/openapi.json").json()["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                schema = json.dumps(parameter["schema"])
                if parameter["in"] == "query" and '"integer"' in schema:
                    assert '"minimum"' in schema and '"ge"' not in schema, parameter
    # Plain digits, zero too, are still numbers.
    for query in ("limit=10&offset=0", "limit=500&offset=10"):
        assert client.get(user.url(f"?{query}"), headers=user.headers).status_code == 200
    resp = client.get(f"/api/{user.user_id}/audit-events?task_id=1&limit=1", headers=user.headers)
    assert resp.status_code == 200, resp.text
