"""A write whose body never came whole: its time limit ran out (the server answered 408), its
chunked framing broke (the server answered 400), or its client closed the connection. None is
a body that is not JSON: the access line, the server span and the request metric say what
happened (they said 400, FastAPI's "error parsing the body", whatever the client got), and
nothing is written.

Real sockets against the app under uvicorn with the protocol `todo-api serve` runs
(service.httpserver), in this process, so that the spans and the metrics can be read.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.app import create_app
from service.database import Database, build_engine
from service.httpserver import BoundedHttpToolsProtocol
from service.settings import Settings, get_settings
from tests.audit_helpers import assert_nothing_written
from tests.reliability_helpers import wait_until
from tests.support import ApiUser, LiveServer, assert_server_problem

BODY_TIMEOUT = 1  # REQUEST_BODY_TIMEOUT_SECONDS, its least
PATIENCE = 30
ROUTE = "/api/{user_id}/tasks"
DURATION = "http.server.request.duration"
PART = b'{"title": "never finished'
FRAMINGS = ["Content-Length: 60000", "Transfer-Encoding: chunked"]


@dataclass
class Served:
    live: LiveServer
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader


@pytest.fixture
def served(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    database: Database,
) -> Iterator[Served]:
    """The app (its spans and its request metrics in memory) under uvicorn with
    `todo-api serve`'s protocol, which reads its time limits from the environment. On an
    engine of its own: an engine is instrumented with one provider, and the shared one's is
    the process's (`database` is asked for the migrated schema). The protocol reads the
    process's settings, cached by whichever test asked first: read again here, and after."""
    monkeypatch.setenv("REQUEST_BODY_TIMEOUT_SECONDS", str(BODY_TIMEOUT))
    get_settings.cache_clear()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    own = Database(build_engine(settings))
    app = create_app(
        settings,
        own,
        tracer_provider=provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    try:
        with LiveServer(app, http=BoundedHttpToolsProtocol) as live:
            yield Served(live, spans, reader)
    finally:
        own.dispose()
        get_settings.cache_clear()


def send_part(served: Served, user: ApiUser, framing: str) -> socket.socket:
    """A task's POST: its head and the start of its body, never the rest."""
    part = PART
    if framing.startswith("Transfer-Encoding"):
        part = b"%x\r\n%s\r\n" % (len(part), part)
    sock = socket.create_connection(("127.0.0.1", served.live.port), timeout=PATIENCE)
    sock.sendall(user.raw_head(framing) + part)
    return sock


def access_line(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The one access line of the request, once written (after the app's request ends)."""
    lines = wait_until(
        lambda: [r for r in caplog.records if r.name == "service.access"], "the access line"
    )
    (line,) = lines
    return line


def server_span(served: Served) -> ReadableSpan:
    def ended() -> list[ReadableSpan]:
        return [s for s in served.spans.get_finished_spans() if s.kind is SpanKind.SERVER]

    (span,) = wait_until(ended, "the server span")
    assert span.name == f"POST {ROUTE}"
    return span


def durations(reader: InMemoryMetricReader) -> dict[Any, int]:
    """How many requests to the route `http.server.request.duration` has counted, by
    `http.response.status_code` (None: without one)."""
    counts: dict[Any, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != DURATION:
                    continue
                for point in metric.data.data_points:
                    attributes = point.attributes or {}
                    if attributes.get("http.route") != ROUTE:
                        continue
                    status = attributes.get("http.response.status_code")
                    counts[status] = counts.get(status, 0) + point.count  # type: ignore[attr-defined]
    return counts


def assert_recorded_as_sent(served: Served, caplog: pytest.LogCaptureFixture, status: int) -> None:
    """The access line, the span's `http.response.status_code` and the metric's say the status
    the server sent in the app's place: a 4xx, not an error on the span."""
    line = access_line(caplog)
    assert (line.getMessage(), line.status) == (f"POST {ROUTE} {status}", status)  # type: ignore[attr-defined]
    assert not hasattr(line, "error_type")
    span = server_span(served)
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == status
    assert "error.type" not in span.attributes
    assert span.status.status_code is StatusCode.UNSET
    wait_until(lambda: durations(served.metrics), "the request to be counted")
    assert durations(served.metrics) == {status: 1}


def read_status(sock: socket.socket) -> int:
    """The server's own answer, read to its close: problem+json, of the app's shape
    (`assert_server_problem`). Its status."""
    with sock.makefile("rb") as answer:
        status_line = answer.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := answer.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = answer.read()  # to the server's close
    status = int(status_line.split()[1])
    assert_server_problem(status, headers, body)
    return status


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_body_past_its_time_limit_is_logged_traced_and_counted_as_the_408_sent(
    served: Served,
    user: ApiUser,
    database: Database,
    caplog: pytest.LogCaptureFixture,
    framing: str,
) -> None:
    """The server answers 408 itself and the app's request sees a disconnect: the app's own
    answer, dropped, is that 408 too (it was FastAPI's 400), so the access line, the span's
    `http.response.status_code` and the metric's say 408: a 4xx, not an error on the span."""
    caplog.set_level(logging.INFO, logger="service.access")
    with send_part(served, user, framing) as sock:
        assert read_status(sock) == 408
    assert_recorded_as_sent(served, caplog, 408)
    assert_nothing_written(database.engine, user.user_id)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_body_its_client_abandoned_is_logged_499_and_traced_as_failed_without_a_status(
    served: Served,
    user: ApiUser,
    database: Database,
    caplog: pytest.LogCaptureFixture,
    framing: str,
) -> None:
    """The client closes the connection with its body half sent. Nothing can be answered, and
    nothing is: the access line says 499 (nginx's "client closed request") with `error_type`;
    the span has no `http.response.status_code` (none was sent) but `error.type` and an error
    status, as OpenTelemetry's HTTP conventions want; the metric counts it without a status
    code (the instrumentation takes the metric's attributes from an answer sent only)."""
    caplog.set_level(logging.INFO, logger="service.access")
    send_part(served, user, framing).close()
    line = access_line(caplog)
    assert (line.getMessage(), line.status) == (f"POST {ROUTE} 499", 499)  # type: ignore[attr-defined]
    assert line.error_type == "client_closed_request"  # type: ignore[attr-defined]
    span = server_span(served)
    assert span.attributes is not None
    assert "http.response.status_code" not in span.attributes
    assert span.attributes["error.type"] == "client_closed_request"
    assert span.status.status_code is StatusCode.ERROR
    wait_until(lambda: durations(served.metrics), "the request to be counted")
    assert durations(served.metrics) == {None: 1}
    assert_nothing_written(database.engine, user.user_id)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_body_with_broken_framing_is_logged_traced_and_counted_as_the_400_sent(
    served: Served,
    user: ApiUser,
    database: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunked body whose framing breaks after its first chunk: the server answers 400
    itself (uvicorn's parser refuses the bytes), in the app's place, and the app's request
    sees a disconnect, as at the time limit. The records say the 400 the client got, not a
    client that closed (499)."""
    caplog.set_level(logging.INFO, logger="service.access")
    with send_part(served, user, "Transfer-Encoding: chunked") as sock:
        sock.sendall(b"not a chunk size\r\n")
        assert read_status(sock) == 400
    assert_recorded_as_sent(served, caplog, 400)
    assert_nothing_written(database.engine, user.user_id)
