"""Tracing and logging, observed in process: spans collected by an in-memory exporter, log
lines read from the real stdout, audit rows read from PostgreSQL.

Most tests give `create_app` their own TracerProvider (an InMemorySpanExporter behind a
SimpleSpanProcessor) and their own engine, so the spans of one request can be inspected
whole. `test_fastapi_native_telemetry_never_doubles_the_server_span` uses the process's
global provider instead, because that is the one FastAPI's own telemetry would use.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from observability import configure_logging, configure_tracing
from observability.flush import flush_telemetry
from observability.metrics import metric_readers
from observability.otel_env import check_otel_environment
from observability.tracing import build_resource, build_tracer_provider, span_exporters
from service import paging
from service.app import create_app
from service.auth import create_dev_token
from service.database import Database, build_engine
from service.settings import AppEnv, ConfigError, Settings
from service.tasks.rules import DIFF_FIELDS
from tests.audit_helpers import scratch_database
from tests.checkpoint_helpers import KEY, with_key
from tests.feed_helpers import FeedReader
from tests.jwt_helpers import random_id
from tests.reliability_helpers import wait_until
from tests.reminder_helpers import at, wait_fired
from tests.serve_helpers import ServeProcess
from tests.support import (
    TEST_SECRET,
    ApiUser,
    LiveServer,
    bearer,
    clean_environ,
    free_port,
)

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
# The port Starlette's TestClient gives as its peer's (scope["client"]).
TESTCLIENT_PORT = 50000


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "todo-api-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture(scope="module")
def traced_database(base_settings: Settings) -> Iterator[Database]:
    """An engine of our own: the shared one is instrumented with the global provider."""
    db = Database(build_engine(base_settings))
    yield db
    db.dispose()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def make_traced_app(settings: Settings, database: Database, provider: TracerProvider) -> FastAPI:
    return create_app(settings, database, tracer_provider=provider)


TracedAppWith = Callable[..., FastAPI]


@pytest.fixture
def traced_app_with(
    settings: Settings,
    traced_database: Database,
    provider: TracerProvider,
    spans: InMemorySpanExporter,
) -> TracedAppWith:
    """`traced_app_with(**changes)`: an app whose spans `spans` collects, with these settings
    changed."""

    def make(**changes: Any) -> FastAPI:
        return make_traced_app(settings.model_copy(update=changes), traced_database, provider)

    return make


@pytest.fixture
def traced_app(traced_app_with: TracedAppWith) -> FastAPI:
    return traced_app_with()


@pytest.fixture
def traced(traced_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(traced_app, raise_server_exceptions=False) as client:
        yield client


# Helpers ----------------------------------------------------------------------------------


def trace_spans(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]


def server_span(exporter: InMemorySpanExporter, trace_id: str) -> ReadableSpan:
    servers = [s for s in trace_spans(exporter, trace_id) if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in trace_spans(exporter, trace_id)]
    return servers[0]


def span_hex(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def all_attribute_text(exporter: InMemorySpanExporter) -> str:
    """Every attribute, event attribute and status description of every span, as one
    string to search."""
    parts: list[str] = []
    for span in exporter.get_finished_spans():
        parts.append(span.name)
        parts.append(span.status.description or "")
        parts.extend(f"{k}={v!s}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.extend(f"{k}={v!s}" for k, v in (event.attributes or {}).items())
    return "\n".join(parts)


def audit_rows(database: Database, user_id: str) -> list[dict[str, Any]]:
    with database.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, action, entity_id, trace_id, span_id, request_id FROM audit_events "
                "WHERE user_id = :user_id ORDER BY seq"
            ),
            {"user_id": user_id},
        ).mappings()
        return [dict(row) for row in rows]


def json_lines(out: str) -> list[dict[str, Any]]:
    """Every stdout line must be one JSON object."""
    lines = [line for line in out.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


# Tracing ----------------------------------------------------------------------------------


def test_one_server_span_per_request_named_by_route_with_stable_http_attributes(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter
) -> None:
    created = traced.post(user.url(), json={"title": "first"}, headers=user.headers)
    assert created.status_code == 201
    task_id = created.json()["id"]
    updated = traced.put(user.url(f"/{task_id}"), json={"title": "second"}, headers=user.headers)
    assert updated.status_code == 200
    listed = traced.get(user.url(), headers=user.headers)
    assert listed.status_code == 200

    expected = [
        (created, "POST", "/api/{user_id}/tasks", 201, user.url()),
        (updated, "PUT", "/api/{user_id}/tasks/{task_id}", 200, user.url(f"/{task_id}")),
        (listed, "GET", "/api/{user_id}/tasks", 200, user.url()),
    ]
    for resp, method, route, status, path in expected:
        trace_id = resp.headers["X-Trace-Id"]
        assert HEX32.match(trace_id)
        server = server_span(spans, trace_id)  # exactly one SERVER span
        assert server.name == f"{method} {route}"
        attributes = dict(server.attributes or {})
        assert attributes["http.request.method"] == method
        assert attributes["http.route"] == route
        assert attributes["http.response.status_code"] == status
        assert attributes["url.path"] == path
        assert attributes["enduser.id"] == user.user_id
        assert server.status.status_code is StatusCode.UNSET
        # No per-message ASGI spans, no FastAPI operation spans: the server span and the
        # database statements are the whole trace.
        others = [s for s in trace_spans(spans, trace_id) if s is not server]
        assert others and all(s.kind is SpanKind.CLIENT for s in others)
        assert not [s for s in others if s.name.endswith((" send", " receive"))]


def test_audit_writes_annotate_the_server_span(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter, traced_database: Database
) -> None:
    created = traced.post(user.url(), json={"title": "audited"}, headers=user.headers)
    task_id = created.json()["id"]
    done = traced.patch(user.url(f"/{task_id}/complete"), headers=user.headers)
    unchanged = traced.put(user.url(f"/{task_id}"), json={"title": "audited"}, headers=user.headers)
    assert (created.status_code, done.status_code, unchanged.status_code) == (201, 200, 200)

    rows = audit_rows(traced_database, user.user_id)
    assert [row["action"] for row in rows] == ["task.created", "task.completed"]
    for resp, row in zip((created, done), rows, strict=True):
        attributes = dict(server_span(spans, resp.headers["X-Trace-Id"]).attributes or {})
        assert attributes["audit.event_id"] == row["id"]
        assert attributes["audit.action"] == row["action"]
        assert attributes["task.id"] == task_id
    # A write that changes nothing records no event, so its span names none.
    nothing = dict(server_span(spans, unchanged.headers["X-Trace-Id"]).attributes or {})
    assert "audit.event_id" not in nothing


def test_database_statements_are_client_spans_under_the_server_span_without_parameters(
    traced: TestClient, make_user: Any, spans: InMemorySpanExporter
) -> None:
    email = f"{random_id(12).lower()}@example.com"
    user = make_user(email=email, name="Parameter Person")
    marker = f"secret-title-{secrets.token_hex(8)}"
    resp = traced.post(
        user.url(), json={"title": marker, "description": marker + "-desc"}, headers=user.headers
    )
    assert resp.status_code == 201
    server = server_span(spans, resp.headers["X-Trace-Id"])
    statements = [s for s in trace_spans(spans, resp.headers["X-Trace-Id"]) if s is not server]
    assert statements
    texts = []
    for span in statements:
        attributes = dict(span.attributes or {})
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert attributes["db.system"] == "postgresql"
        texts.append(str(attributes["db.statement"]))
    # The insert is one CTE with its audit event (audit/recorder.py build_append).
    assert any("INSERT INTO tasks" in text for text in texts)
    assert any("audit_events" in text for text in texts)
    # The statement text, never its parameters; the user id, never the email or the token.
    recorded = all_attribute_text(spans)
    assert marker not in recorded
    assert email not in recorded
    assert "Parameter Person" not in recorded
    assert user.token not in recorded


def test_a_statement_span_is_named_operation_and_database_its_operation_the_keyword_alone(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter
) -> None:
    """`db.operation` is the SQL keyword (semantic conventions), not the span's name
    `<db.operation> <db.name>`, which the instrumentation puts in both."""
    resp = traced.post(user.url(), json={"title": "t"}, headers=user.headers)
    assert resp.status_code == 201
    server = server_span(spans, resp.headers["X-Trace-Id"])
    statements = [s for s in trace_spans(spans, resp.headers["X-Trace-Id"]) if s is not server]
    assert statements
    operations = set()
    for span in statements:
        attributes = dict(span.attributes or {})
        keyword = re.sub(r"^\s*/\*.*?\*/", "", str(attributes["db.statement"])).split()[0]
        assert attributes["db.operation"] == keyword
        assert span.name == f"{keyword} {attributes['db.name']}"
        operations.add(keyword)
    assert "WITH" in operations  # the insert with its audit event (audit/recorder.py)


def test_search_text_stays_out_of_spans_and_logs(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    searched = f"diary-{secrets.token_hex(6)}"
    capsys.readouterr()
    resp = traced.get(user.url(), params={"q": searched, "limit": 5}, headers=user.headers)
    assert resp.status_code == 200
    server = server_span(spans, resp.headers["X-Trace-Id"])
    assert dict(server.attributes or {})["url.query"] == "q=REDACTED&limit=5"
    assert searched not in all_attribute_text(spans)
    # The service's lines; `httpx` is the test's own client logging its request URL.
    service_lines = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] != "httpx"
    ]
    assert service_lines and searched not in json.dumps(service_lines)


def test_a_title_in_a_cursor_stays_out_of_spans(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter
) -> None:
    """A list sorted by title pages with the last title seen in its `after` cursor
    (base64url JSON): what people typed, like `q`, it is not sent to the trace backend."""
    titles = [f"diary-{secrets.token_hex(6)}" for _ in range(2)]
    for title in titles:
        assert traced.post(user.url(), json={"title": title}, headers=user.headers).is_success
    first = traced.get(user.url(), params={"sort": "title", "limit": 1}, headers=user.headers)
    cursor = first.links["next"]["url"].split("after=")[1].split("&")[0]
    assert max(titles) in paging.unwrap(cursor).decode()  # sorted descending
    resp = traced.get(
        user.url(), params={"sort": "title", "limit": 1, "after": cursor}, headers=user.headers
    )
    assert resp.status_code == 200
    server = server_span(spans, resp.headers["X-Trace-Id"])
    assert dict(server.attributes or {})["url.query"] == "sort=title&limit=1&after=REDACTED"
    assert cursor not in all_attribute_text(spans)


@pytest.mark.parametrize(
    ("path", "query", "shown"),
    [
        # EventSource sends no header: a client that skipped the tickets puts its JWT in the URL.
        ("/events", "access_token={token}", "access_token=REDACTED"),
        ("/tasks", "limit=5&token={token}", "limit=5&token=REDACTED"),
        # A path no route serves (a typo): the names some route reads are kept.
        ("/task", "jwt={token}&limit=5", "jwt=REDACTED&limit=5"),
        # The token as the whole query (`${url}?${token}`): a name, but not one a person
        # would give a parameter.
        ("/events", "{token}", "REDACTED=REDACTED"),
        ("/tasks", "limit=5&{token}=", "limit=5&REDACTED=REDACTED"),
    ],
)
def test_a_query_parameter_no_route_reads_is_redacted_in_spans(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    path: str,
    query: str,
    shown: str,
) -> None:
    """Refused with a 400 naming it (or a 404), its value never read: it need not be in the
    trace backend, and a bearer token put in the URL must not be."""
    resp = traced.get(f"/api/{user.user_id}{path}?{query.format(token=user.token)}")
    assert resp.status_code in (400, 401, 404)
    server = server_span(spans, resp.headers["X-Trace-Id"])
    assert dict(server.attributes or {})["url.query"] == shown
    assert user.token not in all_attribute_text(spans)


@pytest.mark.parametrize("sanitized", [None, "x-custom-.*"])
def test_captured_request_headers_never_hold_the_credentials(
    traced_app_with: TracedAppWith,
    user: ApiUser,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    sanitized: str | None,
) -> None:
    """An operator debugging with every request header captured (the instrumentation's
    `OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST=.*`) must not ship bearer
    tokens, nor the Better Auth session cookie a same-site frontend sends along, to the trace
    backend; whatever else the operator has the instrumentation sanitize is sanitized too."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    if sanitized is not None:
        monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", sanitized)
    session = f"session-{secrets.token_hex(8)}"
    custom = f"custom-{secrets.token_hex(8)}"
    with TestClient(traced_app_with(), raise_server_exceptions=False) as client:
        resp = client.get(
            user.url(),
            headers={
                **user.headers,
                "Cookie": f"better-auth.session_token={session}",
                "Proxy-Authorization": f"Basic {session}",
                "X-Custom-Thing": custom,
            },
        )
    assert resp.status_code == 200
    attributes = dict(server_span(spans, resp.headers["X-Trace-Id"]).attributes or {})
    # Still captured, the value hidden.
    assert attributes["http.request.header.authorization"] == ("[REDACTED]",)
    assert attributes["http.request.header.cookie"] == ("[REDACTED]",)
    text = all_attribute_text(spans)
    assert user.token not in text
    assert session not in text
    assert (custom in text) is (sanitized is None)


def test_incoming_traceparent_is_continued_into_the_audit_row(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter, traced_database: Database
) -> None:
    trace_id = secrets.token_hex(16)
    parent_id = secrets.token_hex(8)
    headers = {**user.headers, "traceparent": f"00-{trace_id}-{parent_id}-01"}
    resp = traced.post(user.url(), json={"title": "from the frontend"}, headers=headers)
    assert resp.status_code == 201
    assert resp.headers["X-Trace-Id"] == trace_id

    server = server_span(spans, trace_id)
    assert server.parent is not None and server.parent.is_remote
    assert f"{server.parent.span_id:016x}" == parent_id
    (row,) = audit_rows(traced_database, user.user_id)
    # The audit row points at the request's SERVER span, not at a child or a new trace.
    assert (row["trace_id"], row["span_id"]) == span_hex(server)
    assert row["request_id"] == resp.headers["X-Request-ID"]


def test_health_endpoints_are_not_traced(traced: TestClient, spans: InMemorySpanExporter) -> None:
    for path in ("/healthz", "/readyz"):
        resp = traced.get(path)
        assert resp.status_code == 200
        assert "X-Trace-Id" not in resp.headers
    # Not even the readiness probe's SELECT 1 becomes a trace of its own.
    assert spans.get_finished_spans() == ()


def test_4xx_is_not_an_error(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter
) -> None:
    missing = traced.get(user.url("/999999999"), headers=user.headers)
    unauthenticated = traced.get(user.url(), headers={"Authorization": "Bearer nope"})
    invalid = traced.post(user.url(), json={"title": ""}, headers=user.headers)
    for resp, status in ((missing, 404), (unauthenticated, 401), (invalid, 400)):
        assert resp.status_code == status
        server = server_span(spans, resp.headers["X-Trace-Id"])
        assert server.status.status_code is StatusCode.UNSET
        assert not [e for e in server.events if e.name == "exception"]
        assert dict(server.attributes or {})["http.response.status_code"] == status
    anonymous = server_span(spans, unauthenticated.headers["X-Trace-Id"])
    assert "enduser.id" not in (anonymous.attributes or {})


def test_unhandled_exception_is_a_500_error_span_with_the_exception(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    user: ApiUser,
) -> None:
    app = traced_app_with()

    def explode(user_id: str) -> None:
        raise RuntimeError("kaboom")

    app.add_api_route("/api/{user_id}/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get(f"/api/{user.user_id}/explode")
    assert resp.status_code == 500
    server = server_span(spans, resp.headers["X-Trace-Id"])  # the 500 carries it too
    assert server.name == "GET /api/{user_id}/explode"
    assert server.status.status_code is StatusCode.ERROR
    (event,) = [e for e in server.events if e.name == "exception"]
    assert dict(event.attributes or {})["exception.type"] == "RuntimeError"
    assert dict(server.attributes or {})["http.response.status_code"] == 500


def test_database_outage_503_is_an_error_span_with_the_exception(
    settings: Settings, provider: TracerProvider, spans: InMemorySpanExporter, user: ApiUser
) -> None:
    """A handled 5xx (the error handler answers 503) is still recorded as a failure."""
    down = Database(build_engine(settings, f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    try:
        app = make_traced_app(settings, down, provider)
        with TestClient(app, raise_server_exceptions=False) as client:
            resp = client.get(user.url(), headers=user.headers)
    finally:
        down.dispose()
    assert resp.status_code == 503
    server = server_span(spans, resp.headers["X-Trace-Id"])
    assert server.status.status_code is StatusCode.ERROR
    (event,) = [e for e in server.events if e.name == "exception"]
    assert dict(event.attributes or {})["exception.type"] == "sqlalchemy.exc.OperationalError"


@pytest.fixture
def global_spans(base_settings: Settings) -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's global provider, where native FastAPI
    telemetry would send its spans. Shut down afterwards: the SDK cannot remove it."""
    provider = configure_tracing(base_settings)
    assert isinstance(provider, TracerProvider), "the tests need the SDK (OTEL_SDK_DISABLED?)"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def test_fastapi_native_telemetry_never_doubles_the_server_span(
    global_spans: InMemorySpanExporter, client: TestClient, user: ApiUser
) -> None:
    # The app as production builds it: the process's provider, the shared engine.
    resp = client.post(user.url(), json={"title": "once"}, headers=user.headers)
    assert resp.status_code == 201
    trace = trace_spans(global_spans, resp.headers["X-Trace-Id"])
    server = server_span(global_spans, resp.headers["X-Trace-Id"])
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "opentelemetry.instrumentation.fastapi"
    assert [s for s in trace if s.kind is SpanKind.CLIENT]
    scopes = {s.instrumentation_scope.name for s in trace if s.instrumentation_scope}
    assert "fastapi" not in scopes

    # Control: under this same provider FastAPI's own telemetry does make spans, so the
    # check above would have seen them.
    bare = FastAPI()

    @bare.get("/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    global_spans.clear()
    with TestClient(bare) as bare_client:
        assert bare_client.get("/ping").status_code == 200
    native = [s for s in global_spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.instrumentation_scope.name for s in native if s.instrumentation_scope] == ["fastapi"]


# Configuration ----------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_resource_names_the_service_and_honours_otel_service_name(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    attributes = build_resource(base_settings.model_copy(update={"app_env": AppEnv.production}))
    assert attributes.attributes["service.name"] == "todo-api"
    assert attributes.attributes["service.version"] == metadata.version("todo-api")
    assert attributes.attributes["deployment.environment"] == "production"

    monkeypatch.setenv("OTEL_SERVICE_NAME", "todo-api-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    named = build_resource(base_settings).attributes
    assert named["service.name"] == "todo-api-eu"
    assert named["deployment.environment"] == "staging"


@pytest.mark.parametrize(
    ("resource_attributes", "expected"),
    [
        ("", "production"),  # APP_ENV
        ("deployment.environment=staging", "staging"),  # the old key, as people still write
        ("deployment.environment.name=staging", "staging"),  # the current one
        # Both given and different: the current key wins.
        ("deployment.environment=qa,deployment.environment.name=staging", "staging"),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_both_deployment_environment_keys_always_agree(
    base_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    resource_attributes: str,
    expected: str,
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", resource_attributes)
    production = base_settings.model_copy(update={"app_env": AppEnv.production})
    attributes = build_resource(production).attributes
    assert attributes["deployment.environment"] == expected
    assert attributes["deployment.environment.name"] == expected


@pytest.mark.usefixtures("clean_env")
def test_one_service_instance_id_per_process_for_traces_and_metrics(
    base_settings: Settings,
) -> None:
    """Tracing and metrics each build the resource: both must name the same instance, or a
    process's spans and its metrics cannot be matched up in the backend."""
    first = build_resource(base_settings).attributes["service.instance.id"]
    again = build_resource(base_settings.model_copy(update={"app_env": AppEnv.production}))
    assert again.attributes["service.instance.id"] == first
    # Another process (as each of `serve --workers N` is) has its own.
    script = (
        "from observability.tracing import build_resource\n"
        "from service.settings import Settings\n"
        "print(build_resource(Settings(_env_file=None)).attributes['service.instance.id'])\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert other and other != first


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, [OTLPSpanExporter]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://j:4318/v1/traces"}, [OTLPSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "console"}, [ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, [OTLPSpanExporter, ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4318"}, []),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_exporter_is_chosen_by_the_standard_variables(
    env: dict[str, str], expected: list[type], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert [type(e) for e in span_exporters()] == expected


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://j:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_unsupported_exporter_settings_are_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        span_exporters()


@pytest.mark.usefixtures("clean_env")
def test_sampler_comes_from_the_standard_variables(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = build_tracer_provider(base_settings)
    assert isinstance(default.sampler, sampling.ParentBased)
    assert "AlwaysOnSampler" in default.sampler.get_description()  # type: ignore[no-untyped-call]

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    ratio = build_tracer_provider(base_settings)
    assert "TraceIdRatioBased{0.25}" in ratio.sampler.get_description()
    for provider in (default, ratio):
        provider.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {},
        # Blank is unset, as compose and .env files write a variable left empty.
        {
            name: ""
            for name in ("OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED", "OTEL_BSP_SCHEDULE_DELAY")
        },
        {"OTEL_SDK_DISABLED": "False"},
        # An empty entry, as a template leaves one (`a=1,${EXTRA}`), is skipped, as by the SDK.
        {"OTEL_RESOURCE_ATTRIBUTES": "a=b,"},
        {"OTEL_RESOURCE_ATTRIBUTES": "a=1,,b=2"},
        {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"},
        {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "ignored"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://[::1]:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer xyz, x-tenant=a%20b,",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging, team=core=a",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BSP_EXPORT_TIMEOUT": "0",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300.5",
            "OTEL_METRIC_EXPORT_TIMEOUT": "0",
        },
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_usable_otel_values_are_accepted(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_otel_environment()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "bogus"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://collector:4317"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "just-a-token"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "inf"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1.5"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "-1"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "soon"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=b,c"),
        ("OTEL_RESOURCE_ATTRIBUTES", "=b"),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_unusable_otel_values_are_refused_not_replaced_by_defaults(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "OTEL_TRACES_SAMPLER_ARG":
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        check_otel_environment()


@pytest.mark.parametrize("value", ["b3", "tracecontext,xray", "tracecontext,"])
def test_a_propagator_not_installed_is_refused_in_one_line(
    value: str, database_url: str, tmp_path: Path
) -> None:
    """The OpenTelemetry API loads OTEL_PROPAGATORS when it is first imported: one not
    installed (`b3` from a Zipkin mesh's settings, `xray` on AWS) stopped `serve` and
    `migrate` with a 30-line traceback and exit 1, instead of the one line and exit 2 of any
    other bad setting."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("todo-api")), "migrate"],
        cwd=tmp_path,
        env=clean_environ(DATABASE_URL=database_url, OTEL_PROPAGATORS=value),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("todo-api: configuration error: OTEL_PROPAGATORS"), line


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("value", ["", "tracecontext,baggage", " tracecontext ", "none", "None,b3"])
def test_installed_propagators_are_accepted(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the API loads without a word: `none` (any case) ends the list where it stands."""
    from service.settings import check_propagators

    monkeypatch.setenv("OTEL_PROPAGATORS", value)
    check_propagators()


@pytest.mark.usefixtures("clean_env")
def test_blank_batch_and_reader_variables_are_unset_for_the_sdk_too(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the check accepts is what is used: a blank OTEL_BSP_* or OTEL_METRIC_* passes the
    check as unset, so the SDK must not read it again (it would log an error for each)."""
    for name in (
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_EXPORT_TIMEOUT",
        "OTEL_METRIC_EXPORT_INTERVAL",
        "OTEL_METRIC_EXPORT_TIMEOUT",
    ):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    check_otel_environment()
    with caplog.at_level("WARNING", logger="opentelemetry"):
        provider = build_tracer_provider(base_settings)
        (reader,) = metric_readers(base_settings.model_copy(update={"metrics_enabled": False}))
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]
    provider.shutdown()
    reader.shutdown()
    assert logged == []


@pytest.mark.usefixtures("clean_env")
def test_a_ratio_sampler_without_its_argument_keeps_every_trace(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    provider = build_tracer_provider(base_settings)
    assert provider.sampler.get_description() == "TraceIdRatioBased{1.0}"
    provider.shutdown()


class HungFlush:
    """A provider whose flush waits on a collector that never answers (until released)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timeouts: list[int] = []

    def force_flush(self, timeout_millis: int) -> bool:
        self.timeouts.append(timeout_millis)
        self.entered.set()
        self.release.wait(60)
        return True


def test_shutdown_flushes_spans_and_metrics_at_once_and_gives_up_after_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    traces, metrics = HungFlush(), HungFlush()
    late: list[list[str]] = []
    runner = threading.Thread(target=lambda: late.append(flush_telemetry(traces, metrics, 0.25)))
    try:
        with caplog.at_level("WARNING", logger="observability.flush"):
            runner.start()
            runner.join(30)  # the budget is 0.25 s: still running after 30 s is a hang
        assert not runner.is_alive(), "the flush waited for a collector that never answers"
        assert late == [["traces", "metrics"]]
        # Both flushed at once: the metrics' flush did not wait for the spans', which never
        # ended. Each was given the budget.
        assert traces.entered.wait(30) and metrics.entered.wait(30)
        assert traces.timeouts == metrics.timeouts == [250]
        (warning,) = [r for r in caplog.records if r.name == "observability.flush"]
        assert warning.signals == ["traces", "metrics"]  # type: ignore[attr-defined]
    finally:
        traces.release.set()
        metrics.release.set()


def test_a_flush_that_finishes_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    traces = HungFlush()
    traces.release.set()
    with caplog.at_level("WARNING", logger="observability.flush"):
        assert flush_telemetry(traces, None, 30) == []
    assert traces.timeouts == [30_000]
    assert not [r for r in caplog.records if r.name == "observability.flush"]


def test_no_flush_budget_drops_what_is_held_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SHUTDOWN_FLUSH_SECONDS=0 is the operator's choice, not a collector that is down."""
    traces = HungFlush()
    with caplog.at_level("WARNING", logger="observability.flush"):
        assert flush_telemetry(traces, HungFlush(), 0) == []
    assert traces.timeouts == []
    assert not [r for r in caplog.records if r.name == "observability.flush"]


def test_sdk_disabled_turns_tracing_off(base_settings: Settings, user: ApiUser) -> None:
    """In a fresh process (the provider is per process): no spans, no trace ids."""
    script = """
import json, sys
from fastapi.testclient import TestClient
from opentelemetry import trace
from service.app import create_app
from service.settings import Settings
settings = Settings(_env_file=None, database_url=sys.argv[1], better_auth_secret=sys.argv[2],
                    app_env="test")
with TestClient(create_app(settings)) as client:
    auth = {"Authorization": "Bearer " + sys.argv[4]}
    resp = client.get(f"/api/{sys.argv[3]}/tasks", headers=auth)
print(json.dumps({"status": resp.status_code, "trace": resp.headers.get("x-trace-id"),
                  "provider": type(trace.get_tracer_provider()).__name__}))
"""
    assert base_settings.better_auth_secret is not None
    env = {"PATH": "/usr/bin:/bin", "OTEL_SDK_DISABLED": "true", "LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            base_settings.database_url,
            base_settings.better_auth_secret.get_secret_value(),
            user.user_id,
            user.token,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "trace": None, "provider": "ProxyTracerProvider"}


# Logs -------------------------------------------------------------------------------------


def test_each_change_logs_one_json_line_carrying_the_trace_of_its_span_and_audit_row(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    traced_database: Database,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret_text = f"private-{secrets.token_hex(8)}"
    capsys.readouterr()
    created = traced.post(
        user.url(), json={"title": secret_text, "description": secret_text}, headers=user.headers
    )
    task_id = created.json()["id"]
    task_url = user.url(f"/{task_id}")
    updated = traced.put(task_url, json={"title": secret_text + "!"}, headers=user.headers)
    completed = traced.patch(task_url + "/complete", json={"completed": True}, headers=user.headers)
    deleted = traced.delete(task_url, headers=user.headers)
    assert [r.status_code for r in (created, updated, completed, deleted)] == [201, 200, 200, 204]
    out = capsys.readouterr().out

    assert secret_text not in out  # never title or description text
    lines = json_lines(out)
    changes = [line for line in lines if line["logger"] == "service.tasks"]
    rows = audit_rows(traced_database, user.user_id)
    expected = [
        (created, "task.created", list(DIFF_FIELDS)),
        (updated, "task.updated", ["title"]),
        (completed, "task.completed", ["completed"]),
        (deleted, "task.deleted", list(DIFF_FIELDS)),
    ]
    assert len(changes) == len(rows) == len(expected)
    for line, row, (resp, event, fields) in zip(changes, rows, expected, strict=True):
        server = server_span(spans, resp.headers["X-Trace-Id"])
        trace_id, span_id = span_hex(server)
        assert line["level"] == "INFO"
        assert RFC3339_UTC.match(line["timestamp"])
        assert line["message"] == line["event"] == row["action"] == event
        assert line["task_id"] == task_id
        assert line["user_id"] == user.user_id
        assert line["audit_event_id"] == row["id"]
        assert line["changed_fields"] == fields
        assert line["request_id"] == row["request_id"] == resp.headers["X-Request-ID"]
        # One id everywhere: log line, audit row, span and response header.
        assert line["trace_id"] == row["trace_id"] == trace_id == resp.headers["X-Trace-Id"]
        assert line["span_id"] == row["span_id"] == span_id
        assert HEX32.match(line["trace_id"]) and HEX16.match(line["span_id"])

    access = [line for line in lines if line["logger"] == "service.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("POST", "/api/{user_id}/tasks", 201),
        ("PUT", "/api/{user_id}/tasks/{task_id}", 200),
        ("PATCH", "/api/{user_id}/tasks/{task_id}/complete", 200),
        ("DELETE", "/api/{user_id}/tasks/{task_id}", 204),
    ]
    for line, resp in zip(access, (created, updated, completed, deleted), strict=True):
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["trace_id"] == resp.headers["X-Trace-Id"]
        assert line["request_id"] == resp.headers["X-Request-ID"]
        assert line["user_id"] == user.user_id


def test_tag_names_and_task_text_stay_out_of_spans_and_logs(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tags are user content: not in log lines, span attributes or the traced query."""
    secret = f"tag-{secrets.token_hex(6)}"
    text = f"text-{secrets.token_hex(6)}"
    capsys.readouterr()
    task = traced.post(
        user.url(),
        json={
            "title": text,
            "tags": [secret],
            "due_at": "2027-01-01T00:00:00Z",
            "recurrence": "FREQ=DAILY",
        },
        headers=user.headers,
    ).json()
    listed = traced.get(user.url(), params={"tag": secret, "q": text}, headers=user.headers)
    assert [t["id"] for t in listed.json()] == [task["id"]]
    server = server_span(spans, listed.headers["X-Trace-Id"])
    assert dict(server.attributes or {})["url.query"] == "tag=REDACTED&q=REDACTED"
    traced.patch(user.url(f"/{task['id']}/complete"), headers=user.headers).raise_for_status()
    tags_url = f"/api/{user.user_id}/tags"
    tag = traced.get(tags_url, headers=user.headers).json()[0]
    renamed = traced.patch(
        f"{tags_url}/{tag['id']}", json={"name": secret + "-2"}, headers=user.headers
    )
    assert renamed.status_code == 200
    created = traced.post(tags_url, json={"name": secret + "-3"}, headers=user.headers)
    assert created.status_code == 201
    assert traced.delete(f"{tags_url}/{tag['id']}", headers=user.headers).status_code == 204
    # The service's lines; `httpx` is the test's own client logging its request URL.
    lines = [line for line in json_lines(capsys.readouterr().out) if line["logger"] != "httpx"]
    logged = json.dumps(lines)
    assert secret not in logged and text not in logged
    assert secret not in all_attribute_text(spans) and text not in all_attribute_text(spans)
    tag_lines = [line for line in lines if line["logger"] == "service.tags"]
    assert [line["event"] for line in tag_lines] == ["tag.renamed", "tag.created", "tag.deleted"]
    assert [line["tasks_changed"] for line in tag_lines] == [2, 0, 2]
    task_lines = [line["event"] for line in lines if line["logger"] == "service.tasks"]
    assert task_lines == [
        "task.created",
        "task.completed",
        "task.created",
        "task.updated",
        "task.updated",
        "task.updated",
        "task.updated",
    ]


def test_a_rename_refused_by_the_unique_index_keeps_the_name_out_of_spans_and_logs(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two renames to one name at once: the loser's UPDATE fails on `uq_tags_user_name`,
    whose DETAIL line quotes the key, the tag's name. Its statement span and the log lines
    carry PostgreSQL's first line only."""
    from service.tags import queries as tag_queries

    taken, other = f"taken-{secrets.token_hex(6)}", f"other-{secrets.token_hex(6)}"
    tags_url = f"/api/{user.user_id}/tags"
    for name in (taken, other):
        assert traced.post(tags_url, json={"name": name}, headers=user.headers).status_code == 201
    other_id = next(
        t["id"] for t in traced.get(tags_url, headers=user.headers).json() if t["name"] == other
    )
    # The race's loser checked before the winner committed: the unique index decides.
    monkeypatch.setattr(tag_queries, "check_name_free", lambda *_: None)
    capsys.readouterr()
    refused = traced.patch(
        f"{tags_url}/{other_id}", json={"name": taken.upper()}, headers=user.headers
    )
    assert refused.status_code == 409
    failed = [
        s
        for s in trace_spans(spans, refused.headers["X-Trace-Id"])
        if s.kind is SpanKind.CLIENT and s.status.status_code is StatusCode.ERROR
    ]
    assert [s.name.split()[0] for s in failed] == ["UPDATE"]
    assert failed[0].status.description == (
        'duplicate key value violates unique constraint "uq_tags_user_name"'
    )
    recorded = all_attribute_text(spans)
    logged = capsys.readouterr().out
    for name in (taken, taken.upper(), taken.lower()):
        assert name not in recorded and name not in logged
    assert "DETAIL" not in recorded and "DETAIL" not in logged


@pytest.fixture
def unique_titles(database: Database, user: ApiUser) -> Iterator[None]:
    """A unique index on this user's task titles that the schema does not have: a second
    task with the same title is a real unique violation, whose DETAIL quotes the title."""
    index = f"test_unique_title_{secrets.token_hex(6)}"
    assert user.user_id.isalnum()
    with database.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE UNIQUE INDEX {index} ON tasks (title) WHERE user_id = '{user.user_id}'"
            )
        )
    try:
        yield
    finally:
        with database.engine.begin() as conn:
            conn.execute(sa.text(f"DROP INDEX {index}"))


@pytest.mark.usefixtures("unique_titles")
def test_a_database_error_500_logs_and_traces_no_values_from_its_detail(
    traced: TestClient,
    user: ApiUser,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 500's log line keeps its traceback, but each database error in it says only
    PostgreSQL's first line: the DETAIL (`Key (title)=(...)`) holds the user's text."""
    title = f"private-{secrets.token_hex(8)}"
    created = traced.post(user.url(), json={"title": title}, headers=user.headers)
    assert created.status_code == 201
    capsys.readouterr()
    failed = traced.post(user.url(), json={"title": title}, headers=user.headers)
    assert failed.status_code == 500
    lines = json_lines(capsys.readouterr().out)
    (error,) = [line for line in lines if line["level"] == "ERROR"]
    assert error["message"] == "unhandled error"
    assert error["request_id"] == failed.headers["X-Request-ID"]
    assert error["error_type"] == "IntegrityError"
    trace_text = error["exc_info"]
    assert trace_text.startswith("Traceback (most recent call last):")
    assert "psycopg2.errors.UniqueViolation: duplicate key value violates unique constraint" in (
        trace_text
    )
    assert trace_text.rstrip().splitlines()[-1].startswith("sqlalchemy.exc.IntegrityError: ")
    assert title not in json.dumps(lines) and "DETAIL" not in json.dumps(lines)
    server = server_span(spans, failed.headers["X-Trace-Id"])
    assert server.status.status_code is StatusCode.ERROR
    recorded = all_attribute_text(spans)
    assert title not in recorded and "DETAIL" not in recorded


def test_log_formatters_cut_every_database_error_in_a_traceback_to_its_first_line(
    database: Database,
) -> None:
    """Wherever the database error sits (the exception logged, its cause or context, a
    member of an exception group), both formats keep its first line and drop DETAIL."""
    import logging

    from observability.logging import ConsoleLogFormatter, JsonLogFormatter

    secret = f"value-{secrets.token_hex(6)}"
    with database.engine.connect() as conn:
        conn.execute(sa.text("CREATE TEMPORARY TABLE unique_values (v text UNIQUE)"))
        insert = sa.text("INSERT INTO unique_values VALUES (:v)")
        conn.execute(insert, {"v": secret})
        try:
            conn.execute(insert, {"v": secret})
        except sa.exc.IntegrityError as exc:
            failure = exc
        conn.rollback()
    assert secret in str(failure) and secret in str(failure.orig)

    def raised(exc: BaseException) -> BaseException:
        try:
            raise exc
        except BaseException as caught:
            return caught

    def during_failure() -> BaseException:
        try:
            raise failure
        except sa.exc.IntegrityError:
            return raised(RuntimeError("while handling it"))

    first = 'duplicate key value violates unique constraint "unique_values_v_key"'
    cases = [
        raised(failure),
        raised(RuntimeError("a wrapper")).with_traceback(None),
        during_failure(),
        raised(ExceptionGroup("several", [raised(failure), ValueError("plain")])),
    ]
    cases[1].__cause__ = failure
    for exc in cases:
        record = logging.LogRecord(
            "service.errors",
            logging.ERROR,
            __file__,
            1,
            "unhandled error",
            None,
            (type(exc), exc, exc.__traceback__),
        )
        # Another handler (pytest's) may have formatted and cached the full text first.
        record.exc_text = str(failure)
        for formatter in (JsonLogFormatter(), ConsoleLogFormatter()):
            text = formatter.format(record)
            assert secret not in text and "DETAIL" not in text, (formatter, text)
            assert first in text.replace('\\"', '"'), (formatter, text)


def test_failed_authentication_logs_a_warning_without_the_token(
    traced: TestClient, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    user_id = random_id()
    forged = create_dev_token("another-secret-" + "x" * 40, user_id)
    capsys.readouterr()
    resp = traced.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401
    out = capsys.readouterr().out
    assert forged not in out
    assert forged.split(".")[2] not in out  # not even the signature
    (warning,) = [line for line in json_lines(out) if line["level"] == "WARNING"]
    assert warning["logger"] == "service.errors"
    assert warning["trace_id"] == resp.headers["X-Trace-Id"]
    assert warning["request_id"] == resp.headers["X-Request-ID"]
    assert "user_id" not in warning  # not authenticated: no user is known


def test_a_refused_request_names_the_verified_caller_in_its_span_and_access_line(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    make_user: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The token was verified before the request was refused: a 403 (someone else's tasks)
    and a 429 (over the write limit) say whose token it was, not the URL's user."""
    alice, bob = make_user(), make_user()
    app = traced_app_with(rate_limit_write="1/minute")
    with TestClient(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        forbidden = client.get(bob.url(), headers=alice.headers)
        assert client.post(alice.url(), json={"title": "t"}, headers=alice.headers).is_success
        too_many = client.post(alice.url(), json={"title": "t"}, headers=alice.headers)
    assert (forbidden.status_code, too_many.status_code) == (403, 429)
    access = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] == "service.access"
    ]
    for resp in (forbidden, too_many):
        (line,) = [a for a in access if a["request_id"] == resp.headers["X-Request-ID"]]
        assert (line["status"], line["user_id"]) == (resp.status_code, alice.user_id)
        attributes = dict(server_span(spans, resp.headers["X-Trace-Id"]).attributes or {})
        assert attributes["enduser.id"] == alice.user_id
    (refused,) = [a for a in access if a["status"] == 403]
    assert refused["path"] == bob.url()  # whose tasks were asked for


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_proxy_the_span_and_access_line_name_the_client(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    user: ApiUser,
    capsys: pytest.CaptureFixture[str],
    trusted: bool,
) -> None:
    """An operator looks a client up by its address: behind the load balancer, the one
    X-Forwarded-For names (as the audit log's client_ip), with the proxy as the peer; from
    anyone else the headers are ignored."""
    proxies = ["testclient"] if trusted else []  # TestClient's peer address
    app = traced_app_with(trusted_proxies=proxies)
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    with TestClient(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        resp = client.get(user.url(), headers={**user.headers, **forwarded})
    assert resp.status_code == 200
    (access,) = [
        line
        for line in json_lines(capsys.readouterr().out)
        if line["logger"] == "service.access" and line["request_id"] == resp.headers["X-Request-ID"]
    ]
    attributes = dict(server_span(spans, resp.headers["X-Trace-Id"]).attributes or {})
    if trusted:
        assert access["client_ip"] == "203.0.113.7"
        assert attributes["client.address"] == "203.0.113.7"
        assert attributes["network.peer.address"] == "testclient"
        assert attributes["url.scheme"] == "https"
        # X-Forwarded-For gives no port: the proxy's is the peer's, and the client's unknown.
        assert "client.port" not in attributes
        assert attributes["network.peer.port"] == TESTCLIENT_PORT
    else:
        assert access["client_ip"] == "testclient"
        assert attributes.get("client.address", "testclient") == "testclient"
        assert attributes.get("url.scheme", "http") == "http"
        assert attributes["client.port"] == TESTCLIENT_PORT


def test_a_change_feed_stream_over_the_read_limit_names_its_tickets_user(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    user: ApiUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = traced_app_with(rate_limit_read="1/minute")
    with TestClient(app, raise_server_exceptions=False) as client:
        tickets = f"/api/{user.user_id}/events/tickets"
        stream_url = client.post(tickets, headers=user.headers).json()["stream_url"]
        assert client.get(user.url(), headers=user.headers).status_code == 200
        capsys.readouterr()
        refused = client.get(stream_url, headers={"Accept": "text/event-stream"})
    assert refused.status_code == 429
    access = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] == "service.access"
    ]
    assert [(a["status"], a["user_id"]) for a in access] == [(429, user.user_id)]
    attributes = dict(server_span(spans, refused.headers["X-Trace-Id"]).attributes or {})
    assert attributes["enduser.id"] == user.user_id


def test_answers_given_before_routing_log_the_route_their_span_names(
    settings: Settings,
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    user: ApiUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A CORS preflight, a 413 on Content-Length and a 415 are answered by middleware
    before the router runs; the access line's `route` is still the span's `http.route`."""
    origin = "https://app.example"
    app = traced_app_with(cors_origins=origin)
    json_body = {**user.headers, "Content-Type": "application/json"}
    with TestClient(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        answers = [
            client.options(
                user.url("/7"), headers={"Origin": origin, "Access-Control-Request-Method": "PUT"}
            ),
            client.post(
                user.url(), content=b"x" * (settings.max_body_bytes + 1), headers=json_body
            ),
            client.put(
                user.url("/7"),
                content=b"{}",
                headers={**user.headers, "Content-Type": "text/plain"},
            ),
            client.get("/no/such/route", headers=user.headers),
        ]
    assert [r.status_code for r in answers] == [200, 413, 415, 404]
    access = {
        line["request_id"]: line
        for line in json_lines(capsys.readouterr().out)
        if line["logger"] == "service.access"
    }
    routes = []
    for resp in answers:
        line = access[resp.headers["X-Request-ID"]]
        span_route = dict(server_span(spans, resp.headers["X-Trace-Id"]).attributes or {}).get(
            "http.route"
        )
        assert line["route"] == span_route, (resp.status_code, line)
        routes.append(line["route"])
    assert routes == [
        "/api/{user_id}/tasks/{task_id}",
        "/api/{user_id}/tasks",
        "/api/{user_id}/tasks/{task_id}",
        None,  # no route: the span has none either
    ]


def test_unhandled_error_line_carries_the_request_ids(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = traced_app_with()

    def explode() -> None:
        raise RuntimeError("kaboom")

    app.add_api_route("/explode", explode)
    capsys.readouterr()
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/explode")
    assert resp.status_code == 500
    lines = json_lines(capsys.readouterr().out)
    (error,) = [line for line in lines if line["level"] == "ERROR"]
    assert error["trace_id"] == resp.headers["X-Trace-Id"]
    assert error["request_id"]
    assert "RuntimeError: kaboom" in error["exc_info"]
    (access,) = [line for line in lines if line["logger"] == "service.access"]
    assert access["status"] == 500
    assert access["request_id"] == error["request_id"]


def test_console_format_and_log_level(
    base_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    log = logging.getLogger("service.tasks")
    try:
        configure_logging(base_settings.model_copy(update={"log_format": "console"}))
        capsys.readouterr()
        log.info("task.created", extra={"task_id": 7})
        line = capsys.readouterr().out.strip()
        assert not line.startswith("{")
        assert "INFO" in line and "service.tasks: task.created" in line and "task_id=7" in line

        configure_logging(base_settings.model_copy(update={"log_level": "WARNING"}))
        log.info("hidden")
        log.warning("shown")
        (shown,) = json_lines(capsys.readouterr().out)
        assert shown["message"] == "shown"
    finally:
        configure_logging(base_settings)
    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        Settings(_env_file=None, log_level="verbose")


def test_debug_logging_keeps_the_change_feeds_events_out_of_the_log(
    base_settings: Settings,
    live_server: LiveServer,
    user: ApiUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """sse_starlette logs each chunk it sends at DEBUG: with LOG_LEVEL=DEBUG every event of
    every open stream, its task's title, description and tags, went into the log."""
    title, description = f"diary-{secrets.token_hex(6)}", f"notes-{secrets.token_hex(6)}"
    written: list[str] = []

    def stream_logged() -> bool:
        written.append(capsys.readouterr().out)
        return '"route": "/api/{user_id}/events"' in "".join(written)

    try:
        configure_logging(base_settings.model_copy(update={"log_level": "DEBUG"}))
        created = httpx.post(
            f"{live_server.url}{user.url()}",
            json={"title": title, "description": description},
            headers=user.headers,
        )
        assert created.status_code == 201
        with FeedReader(
            live_server.url, f"/api/{user.user_id}/events", headers=user.headers
        ) as reader:
            assert reader.next_event().json()["after"]["title"] == title
        # The access line of the stream, written once it has ended.
        wait_until(stream_logged, "the stream's access line")
    finally:
        written.append(capsys.readouterr().out)
        configure_logging(base_settings)
    out = "".join(written)
    lines = json_lines(out)
    assert any(line["level"] == "DEBUG" for line in lines)  # DEBUG is on
    assert title not in out and description not in out


def test_the_reminder_loop_makes_no_spans_and_a_firing_writes_its_log_line(
    traced_app_with: TracedAppWith,
    spans: InMemorySpanExporter,
    user: ApiUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A trace per poll of every worker would bury the requests' traces (README, Reminders)."""
    app = traced_app_with(reminders_enabled=True, reminder_poll_seconds=0.05)
    with TestClient(app, raise_server_exceptions=False) as client:
        task = client.post(
            user.url(), json={"title": "t", "remind_at": at(-1)}, headers=user.headers
        ).json()
        (event,) = wait_fired(client, user, task["id"])
        polls_later = len(spans.get_finished_spans())
        time.sleep(0.5)  # about ten more polls
        assert len(spans.get_finished_spans()) == polls_later
    finished = spans.get_finished_spans()
    traced_requests = {s.context.trace_id for s in finished if s.kind is SpanKind.SERVER}
    assert {s.context.trace_id for s in finished} == traced_requests
    statements = [str((s.attributes or {}).get("db.statement", "")) for s in finished]
    assert not [s for s in statements if "SKIP LOCKED" in s or "reminder_fired_for =" in s]
    (line,) = [r for r in caplog.records if r.getMessage() == "reminder.fired"]
    assert (line.task_id, line.user_id, line.audit_event_id, line.late) == (  # type: ignore[attr-defined]
        task["id"],
        user.user_id,
        event["id"],
        False,
    )


def test_a_recurring_completion_puts_the_completion_on_the_span(
    traced: TestClient, user: ApiUser, spans: InMemorySpanExporter, traced_database: Database
) -> None:
    """The completion's event, not the next occurrence's `task.created` written after it
    (which overwrote it): searching traces for completions finds this one."""
    task = traced.post(
        user.url(),
        json={"title": "daily", "due_at": "2030-01-01T09:00:00Z", "recurrence": "FREQ=DAILY"},
        headers=user.headers,
    ).json()
    done = traced.patch(user.url(f"/{task['id']}/complete"), headers=user.headers)
    assert done.status_code == 200 and done.json()["next_task_id"]
    rows = audit_rows(traced_database, user.user_id)
    assert [row["action"] for row in rows] == ["task.created", "task.completed", "task.created"]
    attributes = dict(server_span(spans, done.headers["X-Trace-Id"]).attributes or {})
    assert attributes["audit.event_id"] == rows[1]["id"]
    assert attributes["audit.action"] == "task.completed"
    assert attributes["task.id"] == task["id"]


def test_the_idempotency_purge_makes_no_spans(
    settings: Settings,
    traced_database: Database,
    traced_app: FastAPI,
    spans: InMemorySpanExporter,
) -> None:
    """Housekeeping every few minutes in each process: root spans with no request.
    (`traced_app` instruments the engine, also when this test runs alone.)"""
    from service.maintenance import _purge_untraced
    from service.tasks.idempotency import purge_expired

    before = len(spans.get_finished_spans())
    purge_expired(traced_database.engine, settings.idempotency_retention)  # as it was called
    assert len(spans.get_finished_spans()) > before
    before = len(spans.get_finished_spans())
    _purge_untraced(traced_database, settings)
    assert len(spans.get_finished_spans()) == before


def test_the_periodic_checkpoints_make_no_spans(
    base_settings: Settings, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    """Each instance tries once an interval, outside any request: each of its statements was
    a trace of its own in Jaeger (`SELECT todo`, a CLIENT span and no server span), as the
    purge's were. Its log line says it was made."""
    with scratch_database() as url:
        settings = with_key(
            base_settings.model_copy(
                update={"database_url": url, "audit_checkpoint_interval_seconds": 3600}
            ),
            KEY,
        )
        db = Database(build_engine(settings))
        try:
            with TestClient(create_app(settings, db, tracer_provider=provider)):
                deadline = time.monotonic() + 10
                while not checkpoint_count(url):
                    assert time.monotonic() < deadline, "no checkpoint made"
                    time.sleep(0.05)
            assert [s.name for s in spans.get_finished_spans()] == []
            with db.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            assert spans.get_finished_spans()  # the engine is traced
        finally:
            db.dispose()


def checkpoint_count(url: str) -> int:
    """Read on an engine of its own, untraced."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM audit_checkpoints")
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_a_failing_background_loop_says_why(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The reminder loop, the purge and the change feed's listener retry; their WARNING said
    only `OperationalError` (or `ProgrammingError`), over and over, and nothing told a server
    that is down from a role without a grant or a FEED_DATABASE_URL that names the wrong
    host. Now `reason` is the database's first line."""
    from service.events.hub import FeedHub
    from service.maintenance import background_upkeep

    settings = base_settings.model_copy(
        update={
            "reminders_enabled": True,
            "reminder_poll_seconds": 0.05,
            "idempotency_purge_interval_seconds": 0.05,
        }
    )
    # Nothing listens there: every connection is refused.
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    db = Database(build_engine(settings, nowhere))
    feed = FeedHub(
        lambda: db.dedicated_connection(settings, "todo-api-feed"),
        probe=lambda channel, payload: db.notify(settings, channel, payload),
        max_streams_per_user=1,
        max_streams_per_worker=1,
    )

    async def upkeep_a_while() -> None:
        await feed.start()
        try:
            async with background_upkeep(db, settings):
                await asyncio.sleep(0.5)
        finally:
            await feed.stop()

    try:
        with caplog.at_level("WARNING"):
            asyncio.run(upkeep_a_while())
    finally:
        db.dispose()
    failed = {
        r.getMessage(): r
        for r in caplog.records
        if "failed" in r.getMessage() or "cannot connect" in r.getMessage()
    }
    assert set(failed) == {
        "firing reminders failed",
        "idempotency key purge failed",
        "feed listener cannot connect; retrying",
    }
    for record in failed.values():
        assert record.error_type == "OperationalError"  # type: ignore[attr-defined]
        # libpq's: `connection to server at "127.0.0.1", port N failed: Connection refused`
        assert "Connection refused" in record.reason  # type: ignore[attr-defined]
        assert "\n" not in record.reason  # type: ignore[attr-defined]


def test_old_http_attribute_names_are_redacted_too(database_url: str, tmp_path: Path) -> None:
    """With OTEL_SEMCONV_STABILITY_OPT_IN=http/dup (which the service accepts) the
    instrumentation also writes `http.url` and `http.target`, the whole URL with its query."""
    searched, tagged = f"diary-{secrets.token_hex(6)}", f"tag-{secrets.token_hex(6)}"
    env = {
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SEMCONV_STABILITY_OPT_IN": "http/dup",
    }
    server = ServeProcess(tmp_path, env).start()
    try:
        user_id = random_id()
        headers = bearer(create_dev_token(TEST_SECRET, user_id))
        listed = httpx.get(
            f"{server.url}/api/{user_id}/tasks",
            params={"q": searched, "tag": tagged, "limit": 5},
            headers=headers,
        )
        assert listed.status_code == 200
    finally:
        server.stop()  # the batch processor exports what it holds
    log = server.log.read_text()
    assert '"http.url": "http://127.0.0.1' in log  # the old names are there
    assert "?q=REDACTED&tag=REDACTED&limit=5" in log
    assert searched not in log and tagged not in log
