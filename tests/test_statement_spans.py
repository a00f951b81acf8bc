"""Tracing at a fixed cost: one SERVER span per request and one CLIENT span per statement
sent, whose name and attributes are worked out once per statement text
(`observability.tracing.StatementSpans`); what it costs is measured by
`bench/tracing_cost.py`, not here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.app import create_app
from service.database import Database, build_engine
from service.settings import Settings
from tests.support import ApiUser


class Traced:
    def __init__(self, client: TestClient, spans: InMemorySpanExporter, db: Database) -> None:
        self.client = client
        self.spans = spans
        self.database = db
        self.statements: list[str] = []

        def sent(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            self.statements.append(statement)

        sa.event.listen(db.engine, "before_cursor_execute", sent)

    def take(self) -> tuple[list[Any], list[str]]:
        spans, statements = list(self.spans.get_finished_spans()), self.statements[:]
        self.spans.clear()
        self.statements.clear()
        return spans, statements


@pytest.fixture
def traced(settings: Settings) -> Iterator[Traced]:
    """The app on an engine of its own (an engine is instrumented with one provider)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    database = Database(build_engine(settings))
    app = create_app(settings, database, tracer_provider=provider)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Traced(client, memory, database)
    database.dispose()


def test_one_server_span_and_one_client_span_per_statement(traced: Traced, user: ApiUser) -> None:
    http = traced.client
    first = http.post(user.url(), json={"title": "first"}, headers=user.headers)
    task_url = user.url(f"/{first.json()['id']}")
    traced.take()
    for method, path, body in (
        ("POST", user.url(), {"title": "second", "tags": ["x"]}),
        ("GET", user.url(), None),
        ("PUT", task_url, {"title": "renamed"}),
        ("PATCH", task_url + "/complete", None),
        ("GET", task_url, None),
        ("DELETE", task_url, None),
    ):
        resp = http.request(method, path, json=body, headers=user.headers)
        assert resp.is_success, resp.text
        spans, statements = traced.take()
        servers = [s for s in spans if s.kind is SpanKind.SERVER]
        clients = [s for s in spans if s.kind is SpanKind.CLIENT]
        assert len(servers) == 1 and len(spans) == 1 + len(clients), [s.name for s in spans]
        assert statements, method
        assert [s.attributes["db.statement"] for s in clients] == statements  # type: ignore[index]
        assert all(s.parent is not None for s in clients)
        assert {s.parent.span_id for s in clients} == {servers[0].context.span_id}  # type: ignore[union-attr]


def test_a_statements_span_attributes_are_the_same_each_time(
    traced: Traced, user: ApiUser, settings: Settings
) -> None:
    """Worked out once, reused: the second list's spans carry what the first one's did."""
    http = traced.client
    http.post(user.url(), json={"title": "a"}, headers=user.headers)
    http.get(user.url(), headers=user.headers)
    traced.take()
    described = []
    for _ in range(2):
        http.get(user.url(), headers=user.headers)
        spans, _ = traced.take()
        described.append(
            [(s.name, dict(s.attributes or {})) for s in spans if s.kind is SpanKind.CLIENT]
        )
    assert described[0] == described[1]
    url = sa.make_url(settings.database_url or "")
    for name, attributes in described[0]:
        operation = str(attributes["db.statement"]).split()[0]
        assert name == f"{operation} {url.database}"
        assert attributes["db.operation"] == operation  # the keyword alone, as the conventions say
        assert attributes["db.system"] == "postgresql"
        assert attributes["db.name"] == url.database
        # A Unix-socket URL (the embedded server's) has no host to name.
        assert attributes.get("server.address") == url.host


def test_a_failed_statement_ends_its_span_as_an_error(traced: Traced) -> None:
    with traced.database.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
        conn.execute(sa.text("SELECT 1 / 0"))
    spans, _ = traced.take()
    failed = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert len(failed) == 1 and failed[0].end_time is not None
    assert failed[0].status.status_code is StatusCode.ERROR


def test_a_failed_statements_span_says_postgresqls_first_line_only(traced: Traced) -> None:
    """The DETAIL line quotes the values (`Key (v)=(...) already exists`): not in the span."""
    secret = "value-" + "9f3c1a"
    with traced.database.engine.connect() as conn:
        conn.execute(sa.text("CREATE TEMPORARY TABLE unique_values (v text UNIQUE)"))
        insert = sa.text("INSERT INTO unique_values VALUES (:v)")
        conn.execute(insert, {"v": secret})
        with pytest.raises(sa.exc.IntegrityError, match="DETAIL"):
            conn.execute(insert, {"v": secret})
    spans, _ = traced.take()
    (failed,) = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert failed.status.description == (
        'duplicate key value violates unique constraint "unique_values_v_key"'
    )
    assert secret not in str(failed.attributes) and secret not in str(failed.events)


def test_a_list_page_with_its_total_is_one_statement(traced: Traced, user: ApiUser) -> None:
    """An unfiltered page that is not the whole list reads its X-Total-Count (the user's
    running count) in the page's own statement: one round trip, one span; a page past the end,
    which has no row to carry it, reads it alone."""
    http = traced.client
    for n in range(3):
        http.post(user.url(), json={"title": f"t{n}"}, headers=user.headers)
    traced.take()
    resp = http.get(user.url(), params={"limit": 2}, headers=user.headers)
    assert resp.status_code == 200 and resp.headers["X-Total-Count"] == "3"
    spans, statements = traced.take()
    assert len(statements) == 1, statements
    assert len([s for s in spans if s.kind is SpanKind.CLIENT]) == 1
    assert "task_count" in statements[0]

    resp = http.get(user.url(), params={"offset": 5}, headers=user.headers)
    assert resp.json() == [] and resp.headers["X-Total-Count"] == "3"
    _, statements = traced.take()
    assert len(statements) == 2 and "task_count" in statements[1], statements
