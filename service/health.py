"""Liveness and readiness, without auth."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.auth import TokenVerifier
from service.database import Database
from service.errors import RETRY_AFTER_SECONDS, is_disconnect, problem
from service.openapi import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database answers and, with BETTER_AUTH_URL, the token keys are available",
    responses=error_responses(),
)
def readyz(request: Request) -> Any:
    db: Database = request.app.state.db
    verifier: TokenVerifier = request.app.state.verifier
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        if not is_disconnect(exc):
            raise
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        return problem(503, "The database is unavailable.", headers=headers)
    keys = "not used"
    if verifier.uses_jwks:
        # Fetches when none are held yet (at most once per JWKS_MIN_REFETCH_SECONDS).
        keys = "ok" if verifier.prefetch_keys() else "unavailable"
        if keys == "unavailable":
            headers = {"Retry-After": RETRY_AFTER_SECONDS}
            detail = "The token signing keys (JWKS) are unavailable."
            return problem(503, detail, headers=headers)
    return JSONResponse({"status": "ready", "database": "ok", "keys": keys})
