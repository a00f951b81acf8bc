"""The application factory: `service.app:create_app()`, and the ASGI app `service.app:app`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from audit.checkpoint import PeriodicCheckpoints, check_checkpoint_dir, signing_key
from audit.proof import LatestProofs
from audit.routes import keys_router as audit_keys_router
from audit.routes import router as audit_router
from observability import configure_logging, configure_tracing, observe_app
from observability.flush import flush_telemetry
from observability.metrics import (
    check_metrics_enabled,
    configure_metrics,
    metric_exporter_names,
    observe_pool,
    start_metrics_server,
)
from observability.otel_env import check_otel_environment, sdk_disabled
from observability.tracing import build_resource, service_version, span_exporter_names
from service.auth import TokenVerifier, masked_url
from service.database import Database
from service.docs import install_docs
from service.errors import install_error_handlers
from service.events.hub import FeedHub
from service.events.routes import router as events_router
from service.health import metrics_router
from service.health import router as health_router
from service.lifecycle import Drain
from service.maintenance import background_upkeep
from service.middleware import (
    BodyGuardMiddleware,
    ProblemCORSMiddleware,
    RequestIdMiddleware,
    UnhandledErrorMiddleware,
    serve_behind_proxies,
)
from service.openapi import operation_id
from service.ratelimit import RateLimiter, RateLimitHeadersMiddleware, install_rate_limits
from service.reminders.routes import router as reminders_router
from service.settings import Settings, get_settings, origin_of
from service.tasks.routes import router as tasks_router
from service.tasks.tag_routes import router as tags_router
from service.users import UserProvisioner

log = logging.getLogger("service.app")

CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "traceparent",
    "tracestate",
    "If-Match",
    "If-None-Match",
    "Idempotency-Key",
    "X-Request-ID",
    "Last-Event-ID",
    # EventSource polyfills (npm's `eventsource`, LaunchDarkly's) send `no-cache`.
    "Cache-Control",
]
# Every response header a browser client may need to read.
CORS_EXPOSE_HEADERS = [
    "ETag",
    "Location",
    "Link",
    "X-Total-Count",
    "X-Request-ID",
    "X-Trace-Id",
    "Idempotent-Replayed",
    "Retry-After",
    "WWW-Authenticate",
    "RateLimit",
    "RateLimit-Policy",
    "Allow",
]


def create_app(
    settings: Settings | None = None,
    database: Database | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> FastAPI:
    """Build the app. A given `database` is the caller's to dispose of; one made here is ours.

    Spans go to `tracer_provider` if given (tests collect them in memory), else to the
    process's provider configured from the `OTEL_*` variables. A shared engine is
    instrumented once, with the first provider. Likewise the request metrics of the HTTP
    instrumentation go to `meter_provider` if given, else to the process's.
    """
    settings = (settings or get_settings()).with_dev_secret()
    # Here, not in the lifespan: each `serve --workers N` worker imports the app and gets
    # its own logging and span exporter, and the instrumentation must wrap the app before
    # its middleware stack is built.
    configure_logging(settings)
    provider = tracer_provider or configure_tracing(settings)
    process_meters = configure_metrics(settings, build_resource(settings))
    owns_database = database is None
    db = database or Database.from_settings(settings)
    audit_key = signing_key(settings)
    drain = Drain(settings.shutdown_drain_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # What start-up allocated lives as long as the process: moving it out of the
        # collector's reach keeps full collections (and the latency spikes they cause) short.
        gc.collect()
        gc.freeze()
        await check_token_keys(settings, verifier)
        checkpoints = None
        if audit_key is not None and settings.audit_checkpoint_interval_seconds:
            maker = PeriodicCheckpoints(
                db,
                audit_key,
                settings.audit_checkpoint_interval_seconds,
                settings.audit_checkpoint_dir,
            )
            # Untraced, as the reminders and the purge are: outside any request, each of its
            # statements would be a trace of its own. The task and the threads it hands the
            # work to run in a copy of this context.
            with suppress_instrumentation():
                checkpoints = asyncio.create_task(maker.run(), name="audit-checkpoints")
        # Under `todo-api serve`, SIGTERM first drains (/readyz 503), then uvicorn stops.
        drain.install()
        drain.on_stop(feed.close_streams_threadsafe)
        metrics_server = start_metrics_server(settings)
        await feed.start()
        try:
            async with background_upkeep(db, settings):
                yield
        finally:
            await feed.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        if checkpoints is not None:
            checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoints
        # At most SHUTDOWN_FLUSH_SECONDS, however slow the collector.
        flush_telemetry(provider, process_meters, settings.shutdown_flush_seconds)
        if owns_database:
            db.dispose()

    app = FastAPI(
        title="todo-api",
        version=service_version(),
        summary="Tasks of signed-in users, with an audit trail.",
        lifespan=lifespan,
        servers=[{"url": "/", "description": "This server"}],
        generate_unique_id_function=operation_id,
        docs_url=None,  # self-hosted assets: service.docs
        redoc_url=None,
        # Tracing is set up by `observability` with the OpenTelemetry instrumentation;
        # FastAPI's own telemetry would add a second SERVER span and operation spans to
        # every request (tests/test_observability.py checks there is one).
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.settings = settings
    app.state.db = db
    app.state.verifier = verifier = TokenVerifier.from_settings(settings)
    app.state.drain = drain
    app.state.users = UserProvisioner(db.engine)
    app.state.audit_signing_key = audit_key
    app.state.audit_proofs = LatestProofs()
    feed = FeedHub(
        lambda: db.dedicated_connection(settings, "todo-api-feed"),
        probe=lambda channel, payload: db.notify(settings, channel, payload),
        max_streams_per_user=settings.feed_max_streams_per_user,
        max_streams_per_worker=settings.feed_max_streams_per_worker,
    )
    app.state.feed = feed

    install_error_handlers(app)
    install_rate_limits(app, RateLimiter(settings))
    install_docs(app)
    app.include_router(health_router)
    if settings.metrics_enabled and settings.metrics_port is None:
        app.include_router(metrics_router)
    app.include_router(tasks_router)
    app.include_router(tags_router)
    app.include_router(reminders_router)
    app.include_router(audit_router)
    app.include_router(audit_keys_router)
    app.include_router(events_router)

    # The last added is the outermost: CORS headers and X-Request-ID go on 413, 415 and
    # unhandled 500 answers too.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitHeadersMiddleware)
    if settings.effective_cors_origins:
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.effective_cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
    observe_pool(db.engine)
    observe_app(app, db.engine, provider, meter_provider)
    if settings.trusted_proxies:
        serve_behind_proxies(app, settings.trusted_proxies)
    return app


def check_settings(settings: Settings) -> None:
    """Raise ConfigError for what `create_app` would refuse, without starting anything.

    `todo-api serve` calls it before uvicorn starts: a worker whose `create_app` raises prints
    a traceback, and uvicorn restarts it forever.
    """
    signing_key(settings)
    check_checkpoint_dir(settings)
    TokenVerifier.from_settings(settings)
    RateLimiter(settings)
    check_metrics_enabled(settings)
    if not sdk_disabled():
        check_otel_environment()
        span_exporter_names()
        metric_exporter_names(settings)


async def check_token_keys(settings: Settings, verifier: TokenVerifier) -> None:
    """JWKS mode: say what is misconfigured, and fetch the keys once before serving.

    A failed fetch is a loud warning, not a crash: the frontend that serves the keys may
    simply start later. /readyz reports whether keys are available.
    """
    if not verifier.uses_jwks:
        return
    if settings.better_auth_url_has_base_path and not settings.better_auth_jwks_url:
        assert settings.better_auth_url is not None
        origin = masked_url(origin_of(settings.better_auth_url))
        log.warning(
            "BETTER_AUTH_URL=%s has a path; using its origin %s (keys from %s, expected "
            "iss/aud %s). Set BETTER_AUTH_URL=%s.",
            masked_url(settings.better_auth_url),
            origin,
            verifier.jwks_url_shown,
            masked_url(settings.expected_issuer or ""),
            origin,
        )
    if not await to_thread.run_sync(verifier.prefetch_keys):
        log.warning(
            "No token signing keys could be fetched from %s (BETTER_AUTH_JWKS_URL / "
            "BETTER_AUTH_URL). Requests with Better Auth tokens get 503 until the keys can "
            "be fetched: is the frontend running, and is BETTER_AUTH_URL its origin?",
            verifier.jwks_url_shown,
        )
    else:
        log.info("token signing keys fetched from %s", verifier.jwks_url_shown)


def __getattr__(name: str) -> FastAPI:
    # `service.app:app` is built on first access, so importing the module has no side effects.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
