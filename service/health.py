"""Liveness, readiness and the Prometheus metrics (`/metrics`), without auth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from observability import metrics
from observability.tracing import service_version
from service.auth import TokenVerifier
from service.database import Database, retried_once
from service.errors import POOL_EXHAUSTED, RETRY_AFTER_SECONDS, problem
from service.lifecycle import Drain
from service.openapi import error_responses
from service.ratelimit import RateLimiter
from service.routing import Router
from service.schema import schema_problem

if TYPE_CHECKING:
    # For the type only: the plumbing loads no feature (pyproject's import contracts).
    from service.events.hub import FeedHub

router = Router(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class RateLimitStore(BaseModel):
    backend: Literal["memory", "redis"]
    status: Literal["ok", "down"]


class Readiness(BaseModel):
    """What /readyz reports when ready: a store that is down, or a feed that is not `ok`,
    does not make it 503 (tasks work without them)."""

    status: Literal["ready"]
    database: Literal["ok"]
    keys: Literal["ok", "not used"]
    rate_limit_store: RateLimitStore
    # `service.events.hub.FeedHub.state`.
    feed: Literal["ok", "connecting", "not_receiving", "stopped"]


@router.get("/healthz", response_model=Health, summary="The process is up, and its version")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": service_version()}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database answers, the token keys (with BETTER_AUTH_URL) are available, and the "
    "instance is not shutting down; also reports the rate-limit store and the change feed",
    responses=error_responses(),
)
async def readyz(request: Request) -> Any:
    db: Database = request.app.state.db
    verifier: TokenVerifier = request.app.state.verifier
    drain: Drain = request.app.state.drain
    if drain.draining:
        # Shutting down: a load balancer should stop sending here (requests are still served).
        metrics.unavailable("draining")
        return problem(
            503, "The instance is shutting down.", headers={"Retry-After": RETRY_AFTER_SECONDS}
        )
    try:
        schema = await run_in_threadpool(_ping_database, db)
    except PoolTimeoutError:
        metrics.unavailable("pool")
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        return problem(503, f"{POOL_EXHAUSTED}.", headers=headers)
    except DBAPIError:
        # Any failure of the database, not only a lost connection (a statement timeout, a
        # server in recovery): not ready.
        metrics.unavailable("database")
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        return problem(503, "The database is unavailable.", headers=headers)
    if schema is not None:
        # Its requests would be 500s until someone migrates: keep it out of the rotation.
        metrics.unavailable("schema")
        return problem(503, schema, headers={"Retry-After": RETRY_AFTER_SECONDS})
    keys = "not used"
    if verifier.uses_jwks:
        # Fetches when none are held yet (at most once per JWKS_MIN_REFETCH_SECONDS).
        keys = "ok" if await run_in_threadpool(verifier.prefetch_keys) else "unavailable"
        if keys == "unavailable":
            metrics.unavailable("token_keys")
            headers = {"Retry-After": str(verifier.keys_retry_after())}
            detail = "The token signing keys (JWKS) are unavailable."
            return problem(503, detail, headers=headers)
    # Reported, never a reason to be unready: the limits fail open (see service.ratelimit).
    limiter: RateLimiter = request.app.state.rate_limiter
    store = {"backend": limiter.store_name, "status": "ok" if await limiter.ping() else "down"}
    # Reported, never a reason to be unready either: tasks work without it; its streams get
    # 503 until its listener is verified (see service.events.hub).
    feed: FeedHub = request.app.state.feed
    return JSONResponse(
        {
            "status": "ready",
            "database": "ok",
            "keys": keys,
            "rate_limit_store": store,
            "feed": feed.state,
        }
    )


def _ping_database(db: Database) -> str | None:
    """The database answers: why its schema will not do, or None."""

    def ping() -> str | None:
        with db.engine.connect() as conn:
            return schema_problem(conn)

    return retried_once(ping)


metrics_router = Router(tags=["health"])


@metrics_router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """For a Prometheus scraper: no auth (nothing about users is in it), not rate limited."""
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
