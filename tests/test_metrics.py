"""Metrics: Prometheus at /metrics (off by default, optionally on its own port) and OTLP push."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from opentelemetry import metrics as otel_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import SecretStr

from audit.schemas import AuditAction
from observability import metrics
from service.app import create_app
from service.auth import create_dev_token
from service.database import Database, build_engine
from service.ratelimit import Category
from service.settings import Settings
from tests.audit_helpers import change, scratch_database, tampering
from tests.jwt_helpers import random_id
from tests.otlp_receiver import MetricsReceiver
from tests.reliability_helpers import write_past_the_statement_timeout
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, ApiUser, create_task, free_port

_reader: InMemoryMetricReader | None = None


@pytest.fixture(scope="session")
def metric_reader() -> InMemoryMetricReader:
    """The test process's MeterProvider: in memory, and Prometheus for /metrics. Set once (the
    global provider cannot be replaced); values are cumulative, so tests compare deltas."""
    global _reader
    if _reader is None:
        current = otel_metrics.get_meter_provider()
        assert not isinstance(current, MeterProvider), "another test set a provider"
        _reader = InMemoryMetricReader()
        provider = MeterProvider(
            metric_readers=[_reader, PrometheusMetricReader(registry=metrics.REGISTRY)]
        )
        otel_metrics.set_meter_provider(provider)
    return _reader


def value(reader: InMemoryMetricReader, name: str, **attributes: Any) -> float:
    """The sum of the points of `name` whose attributes include `attributes`."""
    data = reader.get_metrics_data()
    total = 0.0
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    if all(point.attributes.get(k) == v for k, v in attributes.items()):
                        total += getattr(point, "value", None) or getattr(point, "count", 0)
    return total


def _client(settings: Settings, database: Database, **update: object) -> TestClient:
    app = create_app(settings.model_copy(update=update), database)
    return TestClient(app, raise_server_exceptions=False)


def test_metrics_endpoint_is_off_by_default(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 404


def test_prometheus_endpoint_reports_requests_pool_and_audit_without_user_data(
    settings: Settings, database: Database, user: ApiUser, metric_reader: InMemoryMetricReader
) -> None:
    with _client(settings, database, metrics_enabled=True) as client:
        created = client.post(user.url(), json={"title": "secret title"}, headers=user.headers)
        assert created.status_code == 201
        task_id = created.json()["id"]
        assert client.get(user.url(f"/{task_id}"), headers=user.headers).status_code == 200
        assert client.get(user.url("/999999999"), headers=user.headers).status_code == 404
        scrape = client.get("/metrics")  # no token: never behind the user auth
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    # The instrumentation's standard histogram, by route template and status.
    assert "http_server_request_duration_seconds_bucket{" in text
    created_line = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count{")
        and 'http_route="/api/{user_id}/tasks"' in line
        and 'http_response_status_code="201"' in line
        and 'http_request_method="POST"' in line
    ]
    assert created_line, text
    assert 'http_route="/api/{user_id}/tasks/{task_id}"' in text
    assert 'http_response_status_code="404"' in text
    # The pool, by state, with the semantic conventions' names.
    assert "db_client_connection_count{" in text
    assert 'db_client_connection_state="idle"' in text
    assert 'db_client_connection_state="used"' in text
    assert "db_client_connection_max{" in text
    assert "db_client_connection_overflow{" in text
    assert 'todo_api_audit_events_total{audit_action="task.created"' in text
    # Nothing about the user or the task's content; probes and /metrics are not measured.
    assert user.user_id not in text
    assert "secret title" not in text
    assert not re.search(r"/tasks/\d", text)  # paths with ids never become labels
    assert 'http_route="/metrics"' not in text and 'http_route="/readyz"' not in text


def test_audit_events_are_counted_by_action_once_committed(
    client: TestClient, user: ApiUser, metric_reader: InMemoryMetricReader
) -> None:
    before = {
        action: value(metric_reader, "todo_api.audit.events", **{"audit.action": action})
        for action in ("task.created", "task.deleted")
    }
    task = client.post(user.url(), json={"title": "t"}, headers=user.headers).json()
    assert client.delete(user.url(f"/{task['id']}"), headers=user.headers).status_code == 204
    # A rolled-back write (If-Match mismatch) records nothing.
    stale = {**user.headers, "If-Match": '"0-0"'}
    assert client.put(
        user.url(f"/{task['id']}"), json={"title": "x"}, headers=stale
    ).status_code in (404, 412)
    after = {
        action: value(metric_reader, "todo_api.audit.events", **{"audit.action": action})
        for action in before
    }
    assert after["task.created"] - before["task.created"] == 1
    assert after["task.deleted"] - before["task.deleted"] == 1


def test_503s_are_counted_by_cause(
    base_settings: Settings, client: TestClient, metric_reader: InMemoryMetricReader
) -> None:
    def count(cause: str) -> float:
        return value(metric_reader, "todo_api.http.unavailable", cause=cause)

    draining, database_down = count("draining"), count("database")
    client.app.state.drain.begin(lambda: None)  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 503
    assert count("draining") - draining == 1

    dead_url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    dead = Database(build_engine(base_settings, dead_url))
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    try:
        with _client(base_settings, dead) as down:
            assert down.get("/readyz").status_code == 503
            listed = down.get(f"/api/{user_id}/tasks", headers=headers)
            assert listed.status_code == 503
    finally:
        dead.dispose()
    assert count("database") - database_down == 2


def test_a_database_outage_log_line_says_why(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's first line: a refusal, a reset and a connect timeout need different fixes."""
    dead = Database(build_engine(base_settings, f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    try:
        with _client(base_settings, dead) as down, caplog.at_level("ERROR", "service.errors"):
            assert down.get(f"/api/{user_id}/tasks", headers=headers).status_code == 503
    finally:
        dead.dispose()
    [record] = [r for r in caplog.records if r.getMessage() == "database unavailable"]
    assert "Connection refused" in record.reason  # type: ignore[attr-defined]
    assert "\n" not in record.reason  # type: ignore[attr-defined]


def test_an_exhausted_pool_is_its_own_cause_not_the_database(
    base_settings: Settings, metric_reader: InMemoryMetricReader
) -> None:
    """Every pooled connection busy: the instance is overloaded, the database may be fine."""

    def count(cause: str) -> float:
        return value(metric_reader, "todo_api.http.unavailable", cause=cause)

    small = base_settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_seconds": 1}
    )
    busy = Database(build_engine(small))
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    pool, database_down = count("pool"), count("database")
    try:
        with _client(small, busy) as client, busy.engine.connect() as held:
            held.execute(sa.text("SELECT 1"))
            for resp in (
                client.get("/readyz"),
                client.get(f"/api/{user_id}/tasks", headers=headers),
            ):
                assert resp.status_code == 503
                assert resp.json()["detail"].startswith("No database connection was free in time")
                assert resp.headers["Retry-After"]
    finally:
        busy.dispose()
    assert (count("pool") - pool, count("database") - database_down) == (2, 0)


def test_a_statement_timeout_is_counted_as_db_timeout(
    settings: Settings, database: Database, user: ApiUser, metric_reader: InMemoryMetricReader
) -> None:
    def count(cause: str) -> float:
        return value(metric_reader, "todo_api.http.unavailable", cause=cause)

    timeouts, database_down = count("db_timeout"), count("database")
    resp = write_past_the_statement_timeout(settings, database.engine, user.headers, user.url())
    assert resp.status_code == 503
    assert (count("db_timeout") - timeouts, count("database") - database_down) == (1, 0)


def test_rate_limit_rejections_and_store_errors_are_counted(
    settings: Settings, database: Database, user: ApiUser, metric_reader: InMemoryMetricReader
) -> None:
    rejected = value(
        metric_reader, "todo_api.rate_limit.rejections", **{"rate_limit.category": "write"}
    )
    with _client(settings, database, rate_limit_write="1/minute") as client:
        for _ in range(3):
            client.post(user.url(), json={"title": "t"}, headers=user.headers)
    after = value(
        metric_reader, "todo_api.rate_limit.rejections", **{"rate_limit.category": "write"}
    )
    assert after - rejected == 2

    errors = value(metric_reader, "todo_api.rate_limit.store_errors")
    dead = SecretStr(f"redis://127.0.0.1:{free_port()}/0")
    with _client(settings, database, redis_url=dead) as client:
        for _ in range(3):
            assert client.get(user.url(), headers=user.headers).status_code == 200
    assert value(metric_reader, "todo_api.rate_limit.store_errors") - errors == 3


def test_metrics_on_a_separate_port(
    settings: Settings, database: Database, user: ApiUser, metric_reader: InMemoryMetricReader
) -> None:
    port = free_port()
    with _client(settings, database, metrics_enabled=True, metrics_port=port) as client:
        assert client.post(user.url(), json={"title": "t"}, headers=user.headers).status_code == 201
        assert client.get("/metrics").status_code == 404  # not on the API's port
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert scrape.status_code == 200
        assert "http_server_request_duration_seconds_bucket{" in scrape.text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)  # closed with the app


@pytest.fixture
def metrics_receiver() -> Iterator[MetricsReceiver]:
    receiver = MetricsReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


def pushing_metrics(
    tmp_path: Path, database_url: str, receiver: MetricsReceiver, **env: str
) -> ServeProcess:
    """A production `todo-api serve` pushing its metrics to `receiver` every 0.3 s."""
    return ServeProcess(
        tmp_path,
        {
            "APP_ENV": "production",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "OTEL_SDK_DISABLED": "false",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.origin,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            **env,
        },
    ).start()


def test_otlp_metrics_export_from_a_served_process(
    database_url: str, tmp_path: Path, metrics_receiver: MetricsReceiver
) -> None:
    server = pushing_metrics(tmp_path, database_url, metrics_receiver)
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    try:
        created = httpx.post(
            f"{server.url}/api/{user_id}/tasks", json={"title": "t"}, headers=headers, timeout=10
        )
        assert created.status_code == 201
        deadline = time.monotonic() + 20
        while "todo_api.audit.events" not in metrics_receiver.names:
            assert time.monotonic() < deadline, metrics_receiver.names
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/metrics").status_code == 404  # Prometheus is off
    finally:
        assert server.stop() in (0, -15)
    assert {"http.server.request.duration", "db.client.connection.count"} <= metrics_receiver.names
    routes = {a.get("http.route") for a in metrics_receiver.attributes}
    assert "/api/{user_id}/tasks" in routes
    assert not [a for a in metrics_receiver.attributes if user_id in a.values()]


def test_every_known_counter_series_is_0_from_start_up_scraped_and_pushed(
    database_url: str, tmp_path: Path, metrics_receiver: MetricsReceiver
) -> None:
    """An alert on a counter reads 0 before its first increment, not "no data": each value of
    a label with few known values (the 503's cause, the limit's category, the verification's
    mode, the audit action) is a series at 0 in a process that has served nothing yet."""
    known = {
        "todo_api.http.unavailable": ("cause", get_args(metrics.UnavailableCause)),
        "todo_api.audit.verify.failures": ("audit.verify.mode", get_args(metrics.VerifyMode)),
        "todo_api.rate_limit.rejections": ("rate_limit.category", list(Category)),
        "todo_api.audit.events": ("audit.action", list(AuditAction)),
        "todo_api.rate_limit.store_errors": (None, [None]),
    }
    expected = {
        (name, ((label, str(value)),) if label else ())
        for name, (label, values) in known.items()
        for value in values
    }
    assert len(expected) == 7 + 2 + 4 + 6 + 1
    server = pushing_metrics(tmp_path, database_url, metrics_receiver, METRICS_ENABLED="true")
    try:
        scrape = httpx.get(f"{server.url}/metrics", timeout=10).text
        deadline = time.monotonic() + 20
        while not expected <= metrics_receiver.sums.keys():
            assert time.monotonic() < deadline, sorted(expected - metrics_receiver.sums.keys())
            time.sleep(0.1)
    finally:
        assert server.stop() in (0, -15)
    assert {key: metrics_receiver.sums[key] for key in expected} == dict.fromkeys(expected, 0.0)
    scraped = {}
    for line in scrape.splitlines():
        if match := re.fullmatch(r"(todo_api_\w+)_total(?:\{(.*)\})? (\S+)", line):
            pairs = re.findall(r'(\w+)="([^"]*)"', match[2] or "")
            labels = {key: v for key, v in pairs if not key.startswith("otel_scope_")}
            scraped[match[1], tuple(sorted(labels.items()))] = float(match[3])
    for name, labels in expected:
        prometheus = (
            name.replace(".", "_"),
            tuple((key.replace(".", "_"), value) for key, value in labels),
        )
        assert scraped.get(prometheus) == 0.0, (prometheus, scrape)


def test_failed_audit_verifications_are_counted_by_mode(
    settings: Settings, make_user: Any, metric_reader: InMemoryMetricReader
) -> None:
    """On a database of its own: the chain is broken on purpose."""

    def failures(mode: str) -> float:
        return value(metric_reader, "todo_api.audit.verify.failures", **{"audit.verify.mode": mode})

    with scratch_database() as url:
        own = settings.model_copy(update={"database_url": url})
        db = Database(build_engine(own))
        try:
            with TestClient(create_app(own, db)) as client:
                broken, intact = make_user(), make_user()
                for user in (broken, intact):
                    task = create_task(client, user, "t")
                    change(client, "PUT", f"/{task['id']}", user, json={"title": "u"})
                with tampering(db.engine) as conn:
                    conn.execute(
                        sa.text("UPDATE audit_events SET user_agent = 'x' WHERE user_id = :u"),
                        {"u": broken.user_id},
                    )
                before = {mode: failures(mode) for mode in ("full", "incremental")}
                for user, full in ((intact, False), (broken, True), (broken, False)):
                    path = f"/api/{user.user_id}/audit-events/verify?full={str(full).lower()}"
                    report = client.get(path, headers=user.headers).json()
                    assert report["ok"] is (user is intact)
        finally:
            db.dispose()
    after = {mode: failures(mode) - before[mode] for mode in before}
    assert after == {"full": 1, "incremental": 1}


@pytest.mark.parametrize(("workers", "metrics_port"), [(1, False), (2, False), (2, True)])
def test_serve_warns_that_a_scrape_reads_one_worker(
    database_url: str, tmp_path: Path, workers: int, metrics_port: bool
) -> None:
    """Counters are per process: with several workers, Prometheus would see them jump between
    the workers' values (the API's port) or see the first worker's alone (METRICS_PORT)."""
    env = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": TEST_SECRET}
    # The SDK fills /metrics (METRICS_ENABLED is refused without it); no spans are exported.
    env |= {"METRICS_ENABLED": "true", "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "none"}
    if metrics_port:
        env["METRICS_PORT"] = str(free_port())
    server = ServeProcess(tmp_path, env, workers=workers).start()
    server.stop()
    warnings = [
        line
        for line in server.log.read_text().splitlines()
        if "each scrape of /metrics reads one worker's counters only" in line
    ]
    if workers == 1:
        assert warnings == []
    else:
        [line] = warnings
        where = "the first worker's" if metrics_port else "the answering worker's"
        assert "METRICS_ENABLED with --workers 2:" in line
        assert where in line
