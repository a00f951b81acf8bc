"""Tracing (OpenTelemetry) and logging (JSON lines) for the app factory.

`create_app` calls `configure_logging` and `configure_tracing` (process-wide, idempotent),
then `observe_app` for the app it built.
"""

from __future__ import annotations

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from sqlalchemy import Engine

from observability.asgi import RequestLogMiddleware, observe_exception_handlers
from observability.logging import configure_logging
from observability.tracing import configure_tracing, instrument_app, instrument_engine

__all__ = ["configure_logging", "configure_tracing", "observe_app"]


def observe_app(
    app: FastAPI,
    engine: Engine,
    tracer_provider: trace.TracerProvider | None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Call last in the factory: after the error handlers and the other middleware, before
    the first request builds the middleware stack. No tracer provider means no tracing; no
    meter provider, the process's."""
    app.add_middleware(RequestLogMiddleware)
    observe_exception_handlers(app)
    if tracer_provider is not None:
        instrument_engine(engine, tracer_provider)
        instrument_app(app, tracer_provider, meter_provider)
