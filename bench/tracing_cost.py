"""What tracing costs per request, in this process's CPU: spans, the span processor, and the
OTLP encoding and export.

The app runs in-process (Starlette's TestClient, rate limits off) on its own database, once
per tracing setup, in interleaved rounds; each figure is process CPU time (every thread: the
endpoint's, the event loop's, the batch processor's exporter) per request, after flushing
what the processor holds. The OTLP receiver is `bench/otlp_sink.py` in a process of its own,
so its CPU is not counted. Then, from the spans of one request, the two parts that a span
processor could batch, measured alone: `BatchSpanProcessor.on_end` per span and the OTLP
protobuf encoding per request. Last, one statement's span alone: a statement on one
connection untraced, with the instrumentation's `EngineTracer` (what the service used before)
and with `observability.tracing.StatementSpans` (what it uses now).

    .venv/bin/python bench/tracing_cost.py [--requests 50] [--rounds 20] [--quick]

Setups: `off` (no provider), `spans` (a provider without processors: spans made and
dropped), `batch` (BatchSpanProcessor to an exporter that drops the batch), `otlp`
(BatchSpanProcessor, OTLP/HTTP protobuf to the sink: what `serve` does with an endpoint set).
No timed assertion anywhere: a loaded machine changes the figures, not their order.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from opentelemetry import metrics  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from bench.run import free_port  # noqa: E402
from observability.tracing import StatementSpans, build_resource  # noqa: E402
from service.app import create_app  # noqa: E402
from service.auth import create_dev_token  # noqa: E402
from service.database import Database, build_engine  # noqa: E402
from service.settings import AppEnv, Settings  # noqa: E402

SETUPS = ("off", "spans", "batch", "otlp")
SECRET = "tracing-cost-secret-" + "x" * 24


class DropExporter(SpanExporter):
    """Takes each batch and drops it: the processor's cost without the encoding."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--db-name", default="todo_bench_tracing")
    parser.add_argument("--requests", type=int, default=50, help="per operation and round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="30 requests, 6 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 30, 6
    return args


def admin_engine(args: argparse.Namespace) -> sa.Engine:
    url = sa.make_url(args.pg_url).set(drivername="postgresql+psycopg2", database="postgres")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT")


def create_database(args: argparse.Namespace) -> str:
    admin = admin_engine(args)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{args.db_name}"'))
    admin.dispose()
    url = sa.make_url(args.pg_url).set(database=args.db_name).render_as_string(False)
    subprocess.run(
        [str(REPO / ".venv/bin/todo-api"), "migrate"],
        env={**os.environ, "DATABASE_URL": url, "OTEL_SDK_DISABLED": "true"},
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=300,
    )
    return url


def drop_database(args: argparse.Namespace) -> None:
    admin = admin_engine(args)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)'))
    admin.dispose()


def provider_for(setup: str, settings: Settings, sink: str) -> TracerProvider | None:
    """The setup's provider; `off` is first, so the process's (none) is made for it."""
    if setup == "off":
        return None
    provider = TracerProvider(resource=build_resource(settings))
    if setup == "batch":
        provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    elif setup == "otlp":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink)))
    return provider


class Setup:
    """One app, with its own engine (an engine is instrumented once, with one provider)."""

    def __init__(self, name: str, settings: Settings, sink: str) -> None:
        self.name = name
        self.provider = provider_for(name, settings, sink)
        self.database = Database(build_engine(settings))
        if self.provider is None:
            # The process's provider, made on the first call, is none while the SDK is off;
            # providers made later (with the variable gone) are real.
            os.environ["OTEL_SDK_DISABLED"] = "true"
        try:
            app = create_app(settings, self.database, tracer_provider=self.provider)
        finally:
            os.environ.pop("OTEL_SDK_DISABLED", None)
        self.client = TestClient(app)
        self.client.__enter__()

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        if self.provider is not None:
            self.provider.shutdown()
        self.database.dispose()


def run_ops(setup: Setup, op: str, n: int, user: str, headers: dict[str, str]) -> float:
    """CPU ms per request for `n` requests of `op`, the processor's pending export included."""
    http = setup.client
    started = time.process_time()
    for i in range(n):
        if op == "create":
            resp = http.post(f"/api/{user}/tasks", json={"title": f"t{i}"}, headers=headers)
        else:
            resp = http.get(f"/api/{user}/tasks", params={"limit": 50}, headers=headers)
        if resp.status_code >= 300:
            raise RuntimeError(f"{op}: {resp.status_code} {resp.text}")
    setup.flush()
    return (time.process_time() - started) * 1000 / n


def one_request_spans(settings: Settings, user: str, headers: dict[str, str]) -> dict[str, Any]:
    """The spans of one create and one list (of a known user), kept in memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=build_resource(settings))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    database = Database(build_engine(settings))
    spans: dict[str, Any] = {}
    with TestClient(create_app(settings, database, tracer_provider=provider)) as http:
        http.get(f"/api/{user}/tasks", headers=headers)  # a known user, as in the rounds
        for op in ("create", "list"):
            memory.clear()
            if op == "create":
                http.post(f"/api/{user}/tasks", json={"title": "spans"}, headers=headers)
            else:
                http.get(f"/api/{user}/tasks", params={"limit": 50}, headers=headers)
            spans[op] = list(memory.get_finished_spans())
    database.dispose()
    return spans


def encode_cost(spans: list[ReadableSpan], batch: int = 512, repeat: int = 20) -> tuple[float, int]:
    """Microseconds to encode one request's spans for OTLP, inside a batch of `batch` spans
    (as the batch processor exports them), and the request's share of the bytes."""
    per_batch = max(1, batch // len(spans))
    batched = spans * per_batch
    started = time.process_time()
    for _ in range(repeat):
        body = encode_spans(batched).SerializeToString()
    elapsed = time.process_time() - started
    return elapsed * 1e6 / (repeat * per_batch), len(body) // per_batch


def on_end_cost(spans: list[ReadableSpan], repeat: int = 5000) -> float:
    """Microseconds per span for BatchSpanProcessor.on_end (the request thread's share)."""
    processor = BatchSpanProcessor(DropExporter(), max_queue_size=len(spans) * repeat + 1)
    started = time.process_time()
    for _ in range(repeat):
        for span in spans:
            processor.on_end(span)
    elapsed = time.process_time() - started
    processor.shutdown()
    return elapsed * 1e6 / (repeat * len(spans))


def statement_span_cost(url: str, rounds: int, n: int = 1000) -> dict[str, float]:
    """CPU microseconds per statement: untraced, EngineTracer, StatementSpans (interleaved)."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    tracer = provider.get_tracer("bench")
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    engines = {name: build_engine(settings) for name in ("untraced", "EngineTracer", "now")}
    usage = metrics.get_meter("bench").create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, engines["EngineTracer"], usage)  # type: ignore[no-untyped-call]
    StatementSpans(tracer, engines["now"])
    statement = sa.text(
        "SELECT id, title FROM tasks WHERE user_id = :u AND completed = false "
        "ORDER BY created_at DESC, id DESC LIMIT 50"
    )
    costs: dict[str, list[float]] = {name: [] for name in engines}
    connections = {name: engine.connect() for name, engine in engines.items()}
    for rnd in range(rounds + 1):
        for name, conn in connections.items():
            started = time.process_time()
            for _ in range(n):
                conn.execute(statement, {"u": "nobody"}).all()
            if rnd:  # the first round warms up
                costs[name].append((time.process_time() - started) * 1e6 / n)
    for name, conn in connections.items():
        conn.close()
        engines[name].dispose()
    provider.shutdown()
    return {name: statistics.median(values) for name, values in costs.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = create_database(args)
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(REPO / "bench/otlp_sink.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        app_env=AppEnv.production,
        database_url=url,
        better_auth_secret=SECRET,
        rate_limit_enabled=False,
        log_level="WARNING",
    )
    user = "bench-tracing"
    headers = {"Authorization": f"Bearer {create_dev_token(SECRET, user)}"}
    setups: list[Setup] = []
    try:
        time.sleep(0.5)  # the sink is listening
        setups = [Setup(name, settings, f"http://127.0.0.1:{port}/v1/traces") for name in SETUPS]
        for setup in setups:  # warm up: the user's row, compiled statements, connections
            run_ops(setup, "create", 20, user, headers)
            run_ops(setup, "list", 20, user, headers)
        results: dict[tuple[str, str], list[float]] = {}
        shuffle = random.Random(7)
        for _ in range(args.rounds):
            order = setups[:]
            shuffle.shuffle(order)  # short rounds in changing order: drift hits all setups
            for setup in order:
                for op in ("create", "list"):
                    cost = run_ops(setup, op, args.requests, user, headers)
                    results.setdefault((setup.name, op), []).append(cost)
        spans = one_request_spans(settings, user, headers)
        per_statement = statement_span_cost(url, max(3, args.rounds // 4))
    finally:
        for setup in setups:
            setup.close()
        sink.terminate()
        sink.wait(10)
        drop_database(args)

    print(f"CPU ms per request, median of {args.rounds} rounds of {args.requests} (all threads)")
    print("| setup | create | create, vs off | list 50 | list, vs off |")
    print("|---|--:|--:|--:|--:|")
    base = {op: statistics.median(results[("off", op)]) for op in ("create", "list")}
    for name in SETUPS:
        create = statistics.median(results[(name, "create")])
        listed = statistics.median(results[(name, "list")])
        print(
            f"| {name} | {create:.2f} | {create - base['create']:+.2f} "
            f"| {listed:.2f} | {listed - base['list']:+.2f} |"
        )
    print()
    print("| request | spans | names | encode us | OTLP bytes | on_end us/span |")
    print("|---|--:|---|--:|--:|--:|")
    for op, finished in spans.items():
        names = ", ".join(sorted({span.name.split(" ")[0] for span in finished}))
        encode_us, size = encode_cost(finished)
        print(
            f"| {op} | {len(finished)} | {names} | {encode_us:.0f} | {size} "
            f"| {on_end_cost(finished):.1f} |"
        )
    print()
    print("CPU us per statement (one connection, median of rounds; the span is the difference)")
    print("| untraced | EngineTracer | StatementSpans |")
    print("|--:|--:|--:|")
    print(
        f"| {per_statement['untraced']:.0f} | {per_statement['EngineTracer']:.0f} "
        f"| {per_statement['now']:.0f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
