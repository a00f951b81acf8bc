"""On the wire: `todo-api serve --workers 2` in a subprocess exports its spans over OTLP/HTTP
to a real receiver on 127.0.0.1, which is what Jaeger's port 4318 would receive.

The batch processor is told to wait ten minutes between exports, so the spans can only arrive
through the flush each worker does when it shuts down.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.auth import create_dev_token
from tests.jwt_helpers import random_id
from tests.otlp_receiver import MetricsReceiver, OtlpReceiver, ReceivedSpan
from tests.reliability_helpers import SilentServer
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, clean_environ, free_port

# The console script installed next to the interpreter running the tests.
TODO_API = Path(sys.executable).with_name("todo-api")
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
WORKERS = 2


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    stdout: Path


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def served(database_url: str, receiver: OtlpReceiver, tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    env = clean_environ(
        APP_ENV="production",
        DATABASE_URL=database_url,
        BETTER_AUTH_SECRET=TEST_SECRET,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.origin,
        OTEL_BSP_SCHEDULE_DELAY="600000",
    )
    stdout = tmp_path / "stdout.log"
    with stdout.open("ab") as out:
        process = subprocess.Popen(
            [
                str(TODO_API),
                "serve",
                "--no-migrate",
                "--port",
                str(port),
                "--workers",
                str(WORKERS),
            ],
            cwd=tmp_path,  # no .env or dev secret file from the working tree
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        yield Served(url, process, stdout)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def stop(served: Served) -> tuple[int, list[dict[str, Any]]]:
    """SIGTERM, as a process manager stops it; then every stdout line must be JSON."""
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(timeout=60)
    lines = served.stdout.read_text().splitlines()
    return code, [json.loads(line) for line in lines if line.strip()]


def test_serve_with_workers_exports_every_span_over_otlp_and_logs_json(
    served: Served, receiver: OtlpReceiver, database_url: str
) -> None:
    user_id = random_id()
    token = create_dev_token(TEST_SECRET, user_id, email="wire@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    frontend_trace = secrets.token_hex(16)
    frontend_span = secrets.token_hex(8)

    # A fresh connection per request, so the requests spread over the workers.
    created = httpx.post(
        f"{served.url}/api/{user_id}/tasks",
        json={"title": "over the wire"},
        headers={**headers, "traceparent": f"00-{frontend_trace}-{frontend_span}-01"},
    )
    assert created.status_code == 201
    task_id = created.json()["id"]
    others = [
        httpx.get(f"{served.url}/api/{user_id}/tasks/{task_id}", headers=headers) for _ in range(8)
    ]
    missing = httpx.get(f"{served.url}/api/{user_id}/tasks/999999999", headers=headers)
    assert [r.status_code for r in others] == [200] * 8
    assert missing.status_code == 404
    assert created.headers["X-Trace-Id"] == frontend_trace

    exit_code, lines = stop(served)
    assert exit_code == 0

    # Every request's SERVER span arrived, from the worker processes, flushed at shutdown.
    for resp in [created, *others, missing]:
        trace = receiver.trace(resp.headers["X-Trace-Id"])
        (server,) = [s for s in trace if s.kind == SPAN_KIND_SERVER]
        assert server.resource["service.name"] == "todo-api"
        assert server.resource["service.version"] == metadata.version("todo-api")
        assert server.resource["deployment.environment"] == "production"
        assert server.attributes["enduser.id"] == user_id
        assert server.attributes["url.path"] == resp.url.path
    # Each worker that served requests sent one export: its flush at shutdown.
    instances = {s.resource["service.instance.id"] for s in receiver.spans}
    assert 1 <= len(instances) <= WORKERS
    assert receiver.requests == len(instances)

    create_trace = receiver.trace(frontend_trace)
    (server,) = [s for s in create_trace if s.kind == SPAN_KIND_SERVER]
    assert server.parent_span_id == frontend_span  # the frontend's trace goes on
    assert server.name == "POST /api/{user_id}/tasks"
    assert server.attributes["http.route"] == "/api/{user_id}/tasks"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 201
    assert server.attributes["audit.action"] == "task.created"
    statements: list[ReceivedSpan] = [s for s in create_trace if s.kind == SPAN_KIND_CLIENT]
    assert statements
    assert all(s.parent_span_id == server.span_id for s in statements)
    assert all(s.attributes["db.system"] == "postgresql" for s in statements)
    assert not any("over the wire" in str(s.attributes) for s in receiver.spans)
    # Probes are not traced.
    assert not [s for s in receiver.spans if s.attributes.get("url.path") == "/healthz"]

    # The audit row and the log line carry the trace that Jaeger received.
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT trace_id, span_id FROM audit_events WHERE user_id = :u"),
                {"u": user_id},
            ).one()
    finally:
        engine.dispose()
    assert tuple(row) == (frontend_trace, server.span_id)
    (created_line,) = [line for line in lines if line.get("event") == "task.created"]
    assert created_line["trace_id"] == frontend_trace
    assert created_line["span_id"] == server.span_id
    assert created_line["user_id"] == user_id

    # Uvicorn's own lines (the supervisor's and the workers') are JSON too, and the access
    # lines are ours, with the route, status and duration.
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    access = [line for line in lines if line["logger"] == "service.access"]
    assert len([a for a in access if a["route"] == "/api/{user_id}/tasks/{task_id}"]) == 9
    assert {(a["method"], a["status"]) for a in access if a["trace_id"] == frontend_trace} == {
        ("POST", 201)
    }
    assert all("duration_ms" in a and "timestamp" in a for a in access)


def test_spans_and_metrics_of_a_process_name_the_same_instance_and_environment(
    receiver: OtlpReceiver, database_url: str, tmp_path: Path
) -> None:
    """A process's spans, its OTLP metrics and its Prometheus `target_info` carry one resource:
    the same `service.instance.id`, and one environment under both keys (the operator's
    `deployment.environment`, not APP_ENV's)."""
    metrics = MetricsReceiver()
    metrics.start()
    server = ServeProcess(
        tmp_path,
        {
            "APP_ENV": "production",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "OTEL_SDK_DISABLED": "false",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.origin}/v1/traces",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{metrics.origin}/v1/metrics",
            "METRICS_ENABLED": "true",
        },
    )
    try:
        server.start()
        user_id = random_id()
        headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
        listed = httpx.get(f"{server.url}/api/{user_id}/tasks", headers=headers, timeout=10)
        assert listed.status_code == 200
        prometheus = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert server.stop() in (0, -15)  # the spans and metrics are flushed as it stops
    finally:
        server.stop()
        metrics.stop()
    (server_span,) = [s for s in receiver.spans if s.kind == SPAN_KIND_SERVER]
    span_resource = server_span.resource
    assert metrics.resources
    for metric_resource in metrics.resources:
        assert metric_resource["service.instance.id"] == span_resource["service.instance.id"]
    (target_info,) = [line for line in prometheus.splitlines() if line.startswith("target_info{")]
    assert f'service_instance_id="{span_resource["service.instance.id"]}"' in target_info
    for resource in [span_resource, *metrics.resources]:
        assert resource["deployment.environment"] == "staging"
        assert resource["deployment.environment.name"] == "staging"


# An export to the hung collector waits this long before giving up.
EXPORT_TIMEOUT_SECONDS = 120


def test_a_hung_collector_delays_shutdown_by_the_flush_budget_not_the_export_timeout(
    database_url: str, tmp_path: Path
) -> None:
    """Stopping flushed the spans, then the metrics, each waiting out the export timeout (here
    2 x 120 s); now both flush at once for SHUTDOWN_FLUSH_SECONDS (here 1), and what is left is
    dropped with a warning. The bound on the stop is a quarter of ONE export timeout: it tells a
    wait for the collector from a slow machine, not a fast stop from a slow one."""
    # A collector that accepts connections and never answers: the database's SilentServer.
    with SilentServer() as collector:
        server = ServeProcess(
            tmp_path,
            {
                "APP_ENV": "production",
                "DATABASE_URL": database_url,
                "BETTER_AUTH_SECRET": TEST_SECRET,
                "OTEL_SDK_DISABLED": "false",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TIMEOUT": str(EXPORT_TIMEOUT_SECONDS),
                # Nothing is exported before the stop: what it flushes meets the hung collector.
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
                "OTEL_METRIC_EXPORT_INTERVAL": "600000",
                "SHUTDOWN_FLUSH_SECONDS": "1",
            },
        ).start()
        try:
            user_id = random_id()
            headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
            listed = httpx.get(f"{server.url}/api/{user_id}/tasks", headers=headers, timeout=10)
            assert listed.status_code == 200
            server.terminate()
            code = server.wait(timeout=EXPORT_TIMEOUT_SECONDS / 4)
        finally:
            server.stop()
    assert code in (0, -15)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    (dropped,) = [line for line in lines if line["logger"] == "observability.flush"]
    assert dropped["level"] == "WARNING"
    assert sorted(dropped["signals"]) == ["metrics", "traces"]
    assert dropped["flush_seconds"] == 1
