"""The documentation a frontend developer reads and generates clients from: self-hosted
Swagger UI and ReDoc, and an OpenAPI document that says what the server does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from pydantic import BaseModel

from service.health import Health, Readiness
from service.problem_types import PROBLEM_TYPE_BASE
from service.tasks.models import DESCRIPTION_MAX, TITLE_MAX

OPERATION_IDS = {
    ("/healthz", "get"): "healthz",
    ("/readyz", "get"): "readyz",
    ("/api/{user_id}/tasks", "get"): "listTasks",
    ("/api/{user_id}/tasks", "post"): "createTask",
    ("/api/{user_id}/tasks/{task_id}", "get"): "getTask",
    ("/api/{user_id}/tasks/{task_id}", "put"): "updateTask",
    ("/api/{user_id}/tasks/{task_id}", "delete"): "deleteTask",
    ("/api/{user_id}/tasks/{task_id}/complete", "patch"): "completeTask",
    ("/api/{user_id}/tags", "get"): "listTags",
    ("/api/{user_id}/tags", "post"): "createTag",
    ("/api/{user_id}/tags/{tag_id}", "get"): "getTag",
    ("/api/{user_id}/tags/{tag_id}", "patch"): "renameTag",
    ("/api/{user_id}/tags/{tag_id}", "delete"): "deleteTag",
    ("/api/{user_id}/reminders", "get"): "listReminders",
    ("/api/{user_id}/audit-events", "get"): "listAuditEvents",
    ("/api/{user_id}/audit-events/verify", "get"): "verifyAuditChain",
    ("/api/{user_id}/tasks/{task_id}/history", "get"): "taskHistory",
    ("/api/{user_id}/audit-events/proof", "get"): "auditProof",
    ("/.well-known/audit-keys.json", "get"): "auditKeys",
    ("/api/{user_id}/events/tickets", "post"): "createStreamTicket",
    ("/api/{user_id}/events", "get"): "streamEvents",
}


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }


# Swagger UI and ReDoc -------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_another_host(client: TestClient, page: str) -> None:
    resp = client.get(page)
    assert resp.status_code == 200
    html = resp.text
    # Every src/href is a path on this server: no CDN, no fonts from elsewhere.
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert urls, html
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
    assert "cdn." not in html and "googleapis" not in html and "unpkg" not in html
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url


def test_swagger_ui_and_redoc_bundles_are_the_real_scripts(client: TestClient) -> None:
    swagger = client.get("/docs-assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in swagger.text[:2000]
    redoc = client.get("/docs-assets/redoc.standalone.js")
    assert "Redoc" in redoc.text[:2000]


# The OpenAPI document -------------------------------------------------------------------


def test_openapi_document_is_valid(spec: dict[str, Any]) -> None:
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema


def test_operation_ids_read_well_in_generated_code(spec: dict[str, Any]) -> None:
    found = {key: op["operationId"] for key, op in _operations(spec).items()}
    assert found == OPERATION_IDS


def test_servers_are_declared(spec: dict[str, Any]) -> None:
    assert spec["servers"] == [{"url": "/", "description": "This server"}]


def test_every_api_route_has_security_and_public_routes_say_none(spec: dict[str, Any]) -> None:
    for (path, method), operation in _operations(spec).items():
        if path == "/api/{user_id}/events":
            # EventSource sends no header: the ticket alone is the other way in.
            assert operation["security"] == [{"HTTPBearer": []}, {"StreamTicket": []}]
            scheme = spec["components"]["securitySchemes"]["StreamTicket"]
            assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "query", "ticket")
        elif path.startswith("/api/"):
            assert operation["security"] == [{"HTTPBearer": []}], (path, method)
        else:
            assert operation["security"] == [], (path, method)


def _by_id(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {operation["operationId"]: operation for operation in _operations(spec).values()}


def _headers(spec: dict[str, Any], op_id: str, code: str) -> set[str]:
    return set(_by_id(spec)[op_id]["responses"][code].get("headers", {}))


def test_response_headers_are_documented_per_operation(spec: dict[str, Any]) -> None:
    assert {"X-Total-Count", "Link", "X-Request-ID", "X-Trace-Id"} <= _headers(
        spec, "listTasks", "200"
    )
    assert {"Location", "ETag", "Idempotent-Replayed"} <= _headers(spec, "createTask", "201")
    for op_id in ("getTask", "updateTask", "completeTask"):
        assert "ETag" in _headers(spec, op_id, "200"), op_id
    assert {"ETag", "X-Request-ID"} <= _headers(spec, "getTask", "304")
    assert "WWW-Authenticate" in _headers(spec, "listTasks", "401")
    assert "Retry-After" in _headers(spec, "createTask", "503")
    for (path, method), operation in _operations(spec).items():
        for code, response in operation["responses"].items():
            headers = response.get("headers", {})
            assert "X-Request-ID" in headers, (path, method, code)
            limited = {"RateLimit", "RateLimit-Policy"} <= set(headers)
            counted = path.startswith("/api/") and code not in {"413", "415"}
            assert limited == counted, (path, method, code)


def test_headers_always_sent_are_required(
    spec: dict[str, Any], client: TestClient, user: Any
) -> None:
    """A header documented as required is on every response it is documented for: checked
    on real responses of each kind (so a generated client may type it as always there)."""
    operations = _by_id(spec)
    required = {
        (op_id, code): {
            name for name, h in response.get("headers", {}).items() if h.get("required")
        }
        for op_id, op in operations.items()
        for code, response in op["responses"].items()
    }
    assert required[("createTask", "201")] >= {"Location", "ETag", "X-Request-ID"}
    assert required[("listTasks", "200")] >= {"X-Total-Count", "X-Request-ID"}
    assert "Link" not in required[("listTasks", "200")]  # only while more remain
    tasks = f"/api/{user.user_id}/tasks"
    created = client.post(tasks, json={"title": "t"}, headers=user.headers)
    task = f"{tasks}/{created.json()['id']}"
    etag = {"If-None-Match": created.headers["ETag"]}
    seen = {
        ("createTask", "201"): created,
        ("listTasks", "200"): client.get(tasks, headers=user.headers),
        ("getTask", "200"): client.get(task, headers=user.headers),
        ("getTask", "304"): client.get(task, headers={**user.headers, **etag}),
        ("updateTask", "200"): client.put(task, json={"title": "u"}, headers=user.headers),
        ("completeTask", "200"): client.patch(f"{task}/complete", headers=user.headers),
        ("getTask", "404"): client.get(f"{tasks}/999999999", headers=user.headers),
        ("listTasks", "400"): client.get(tasks, params={"limit": 0}, headers=user.headers),
        ("listTasks", "401"): client.get(tasks),
        ("createTag", "201"): client.post(
            f"/api/{user.user_id}/tags", json={"name": "n"}, headers=user.headers
        ),
        ("deleteTask", "204"): client.delete(task, headers=user.headers),
    }
    for (op_id, code), response in seen.items():
        assert str(response.status_code) == code, (op_id, response.text)
        missing = {name for name in required[(op_id, code)] if name not in response.headers}
        assert not missing, (op_id, code, missing)


@pytest.mark.parametrize(("path", "model"), [("/healthz", Health), ("/readyz", Readiness)])
def test_probe_bodies_are_documented(
    spec: dict[str, Any], client: TestClient, path: str, model: type[BaseModel]
) -> None:
    """A probe's 200 is typed in the document (it was an untyped object) and is that type."""
    content = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    assert content["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    response = client.get(path)
    assert response.status_code == 200, response.text
    model.model_validate(response.json(), strict=True)


def test_the_streams_description_names_every_resume_parameter(spec: dict[str, Any]) -> None:
    """The description said `Last-Event-ID` or `?after=`: a polyfill's developer reading it
    would not learn that `?lastEventId=` works, nor which one wins."""
    operation = _by_id(spec)["streamEvents"]
    names = {p["name"] for p in operation["parameters"]} - {"user_id", "ticket"}
    assert names == {"after", "Last-Event-ID", "lastEventId"}
    mentioned = set(re.findall(r"`\??([A-Za-z-]+)=?`", operation["description"]))
    assert names <= mentioned, operation["description"]


def test_documented_limits_match_the_server(spec: dict[str, Any], client: TestClient) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("TaskCreate", "TaskUpdate"):
        properties = schemas[name]["properties"]
        title = properties["title"]
        title = next((s for s in title.get("anyOf", [title]) if s.get("type") == "string"), title)
        assert title["maxLength"] == TITLE_MAX, name
        description = properties["description"]
        strings = [s for s in description.get("anyOf", [description]) if s.get("type") == "string"]
        assert strings[0]["maxLength"] == DESCRIPTION_MAX, name


def test_audit_fields_are_typed(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    event = schemas["AuditEventPublic"]["properties"]
    assert event["action"]["type"] == "string"
    assert (
        set(event["action"]["enum"])
        == set(schemas["AuditAction"]["enum"])
        == {
            "task.created",
            "task.updated",
            "task.completed",
            "task.reopened",
            "task.deleted",
            "reminder.fired",
        }
    )
    for side in ("before", "after"):
        refs = [s.get("$ref") for s in event[side]["anyOf"]]
        assert "#/components/schemas/TaskEventState" in refs, side
    # The task as recorded, and the reminder a `reminder.fired` event's `after` adds.
    state = schemas["TaskEventState"]
    assert list(state["properties"]) == [*schemas["TaskSnapshot"]["properties"], "reminder"]
    assert state["required"] == schemas["TaskSnapshot"]["required"]
    assert state["properties"]["reminder"]["$ref"] == "#/components/schemas/FiredReminder"


def test_problem_type_is_documented(spec: dict[str, Any]) -> None:
    problem = spec["components"]["schemas"]["Problem"]["properties"]["type"]
    assert PROBLEM_TYPE_BASE in problem["description"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_forbid_loading_from_elsewhere(client: TestClient, page: str) -> None:
    policy = client.get(page).headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
    assert "http" not in policy


def test_readme_quotes_the_fetch_wrapper_the_browser_tests_run() -> None:
    root = Path(__file__).resolve().parent.parent
    wrapper = (root / "clients" / "todo-api-fetch.js").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert f"```js\n{wrapper}```" in readme


def test_conditional_headers_are_documented(spec: dict[str, Any]) -> None:
    """`If-None-Match` on the task's GET, whose 304 has no body; `If-Match` and
    `If-None-Match` on its writes. Both are one string, a comma-separated list of ETags."""
    operations = _by_id(spec)

    def header(op_id: str, name: str) -> dict[str, Any]:
        (param,) = [p for p in operations[op_id]["parameters"] if p["name"].lower() == name]
        assert param["in"] == "header"
        return dict(param["schema"])

    assert "content" not in operations["getTask"]["responses"]["304"]
    assert any(s.get("type") == "string" for s in header("getTask", "if-none-match")["anyOf"])
    for op_id in ("updateTask", "deleteTask", "completeTask"):
        assert any(s.get("type") == "string" for s in header(op_id, "if-match")["anyOf"])
        assert any(s.get("type") == "string" for s in header(op_id, "if-none-match")["anyOf"])
        assert "412" in operations[op_id]["responses"]
