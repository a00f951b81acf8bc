"""The application factory: `service.app:create_app()`, and the ASGI app `service.app:app`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.trace import TracerProvider

from audit.routes import router as audit_router
from observability import configure_logging, configure_tracing, force_flush, observe_app
from service.auth import TokenVerifier
from service.database import Database
from service.errors import install_error_handlers
from service.middleware import BodyGuardMiddleware, RequestIdMiddleware
from service.routes.health import router as health_router
from service.routes.tasks import router as tasks_router
from service.settings import Settings, get_settings
from service.users import UserProvisioner

CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "traceparent",
    "tracestate",
    "If-Match",
    "Idempotency-Key",
    "X-Request-ID",
]
CORS_EXPOSE_HEADERS = ["ETag", "Location", "X-Request-ID", "X-Total-Count", "Link", "X-Trace-Id"]


def create_app(
    settings: Settings | None = None,
    database: Database | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the app. A given `database` is the caller's to dispose of; one made here is ours.

    Spans go to `tracer_provider` if given (tests collect them in memory), else to the
    process's provider configured from the `OTEL_*` variables. A shared engine is
    instrumented once, with the first provider.
    """
    settings = (settings or get_settings()).with_dev_secret()
    # Here, not in the lifespan: each `serve --workers N` worker imports the app and gets
    # its own logging and span exporter, and the instrumentation must wrap the app before
    # its middleware stack is built.
    configure_logging(settings)
    provider = tracer_provider or configure_tracing(settings)
    owns_database = database is None
    db = database or Database.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # What start-up allocated lives as long as the process: moving it out of the
        # collector's reach keeps full collections (and the latency spikes they cause) short.
        gc.collect()
        gc.freeze()
        yield
        force_flush(provider)
        if owns_database:
            db.dispose()

    app = FastAPI(
        title="todo-api",
        version="0.1.0",
        summary="Tasks of signed-in users, with an audit trail.",
        lifespan=lifespan,
        # Tracing is set up by `observability` with the OpenTelemetry instrumentation;
        # FastAPI's own telemetry would add a second SERVER span and operation spans to
        # every request (tests/test_observability.py checks there is one).
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.settings = settings
    app.state.db = db
    app.state.verifier = TokenVerifier.from_settings(settings)
    app.state.users = UserProvisioner(db.engine)

    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(tasks_router)
    app.include_router(audit_router)

    # The last added is the outermost: CORS headers go on 413 and 415 answers too.
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
    observe_app(app, db.engine, provider)
    return app


def __getattr__(name: str) -> FastAPI:
    # `service.app:app` is built on first access, so importing the module has no side effects.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
