"""The one handler family that renders every error as RFC 9457 problem+json.

The exceptions themselves live in `service.exceptions`, free of any web framework.
"""

from __future__ import annotations

import itertools
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from observability import metrics
from observability.logging import failure_reason
from service.database import QUERY_CANCELED, commit_unanswered
from service.exceptions import (
    AuthError,
    AuthUnavailable,
    DomainError,
    TokenExpired,
    TokenMissing,
)
from service.jsonbody import BodyNotReceived
from service.openapi import install_problem_docs
from service.problem_types import PROBLEM_JSON, ProblemType, problem_body
from service.routing import every_route

log = logging.getLogger("service.errors")

RETRY_AFTER_SECONDS = "2"
BODY_NOT_JSON = "The request body is not valid JSON."


def problem(
    status: int,
    detail: str,
    *,
    kind: ProblemType | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> JSONResponse:
    body = problem_body(status, detail, kind=kind)
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


# Pydantic prefixes the message of an error raised in a validator; the client needs only the
# message itself.
_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """Where the input was, as `<location>.<name>[.<index or key>...]`: `body.title`,
    `query.limit`, `path.task_id`, `header.idempotency-key`; `body` for the body as a whole."""
    if len(loc) > 1 and loc[0] == "header":
        # HTTP header names are case-insensitive; FastAPI reports a declared alias's spelling.
        loc = ("header", str(loc[1]).lower(), *loc[2:])
    return ".".join(str(part) for part in loc) or "body"


def clean_message(message: str) -> str:
    for prefix in _MESSAGE_PREFIXES:
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


# A request can hold thousands of wrong values (a 64 KiB query string of `priority=`): the
# client is told about at most this many, in a body that stays small, and counting them all
# stays linear.
MAX_FIELD_ERRORS = 50


def _field_errors(exc: RequestValidationError) -> tuple[list[dict[str, str]], int]:
    """At most MAX_FIELD_ERRORS distinct errors, and how many distinct ones there were: the
    first error of each wrong field, then the others, each part in the order found (the 30th
    wrong `priority` must not hide a wrong `limit`); items of a list count as their field."""
    found: dict[tuple[str, str], tuple[int | str, ...]] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        # Messages only: pydantic's `input` may echo secrets or huge values back.
        message = clean_message(str(err.get("msg", "invalid")))
        if err.get("type") == "json_invalid":
            loc = loc[:1]  # ("body", <character offset>): the body is what is wrong
            # The decoder's reason (`Expecting value`, a repeated key): it quotes no input
            # beyond a short repeated key (service.jsonbody).
            if reason := (err.get("ctx") or {}).get("error"):
                message = f"{message}: {reason}"
        # A parameter read by both a route and its dependency is checked twice, the same way.
        found.setdefault((field_path(loc), message), loc)
    firsts: list[tuple[str, str]] = []
    fields: set[tuple[int | str, ...]] = set()
    for key, loc in found.items():
        field = loc[:2]  # ("query", "priority"), whatever the index after it
        if field not in fields:
            fields.add(field)
            firsts.append(key)
    chosen = firsts[:MAX_FIELD_ERRORS]
    if len(chosen) < MAX_FIELD_ERRORS:
        first = set(firsts)
        rest = (key for key in found if key not in first)
        chosen += itertools.islice(rest, MAX_FIELD_ERRORS - len(chosen))
    return [{"field": field, "message": message} for field, message in chosen], len(found)


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    errors = None
    if exc.field is not None:
        errors = [{"field": exc.field, "message": exc.detail}]
    return problem(exc.kind.status, exc.detail, kind=exc.kind, headers=exc.headers, errors=errors)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors, count = _field_errors(exc)
    if any(e["message"].startswith("JSON decode error") for e in errors):
        return problem(400, BODY_NOT_JSON, errors=errors)
    more = (
        f" {count} problems were found; {len(errors)} are listed, one for each wrong field first."
        if count > len(errors)
        else ""
    )
    return problem(400, f"The request is not valid.{more}", errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's only 400: a body that json.loads could not read (not UTF-8, nested past
        # the recursion limit, an integer past Python's digit limit).
        message = "Not UTF-8 JSON, or nested or with numbers beyond what can be read."
        return problem(400, BODY_NOT_JSON, errors=[{"field": "body", "message": message}])
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        allow = _allowed_methods(request)
        headers = {**(headers or {}), "Allow": allow}
        detail = f"{request.method} is not allowed here; this path answers {allow}."
    return problem(exc.status_code, detail, headers=headers)


async def _body_not_received(_: Request, exc: Exception) -> JSONResponse | None:
    """Nothing reaches the client from here. Where the server answered in the app's place (a
    408 at the body's time limit, a 400 for broken framing, a 413 past the chunked bound), it
    drops what the app sends (service.httpserver): the same status made here is for the
    record, which the server span, the request metric and the access line take from the
    answer the app sends. A client that closed the connection is sent nothing: the access line
    says 499 (observability.asgi)."""
    assert isinstance(exc, BodyNotReceived)
    if exc.answered is not None:
        return problem(exc.answered, "The request body was not received whole.")
    return None


def _allowed_methods(request: Request) -> str:
    """Every method the path answers. Starlette's 405 names the methods of the first route
    whose path matched, so `/tasks/{id}` said `Allow: GET` though PUT and DELETE answer too."""
    methods: set[str] = set()
    for route in every_route(request.app.routes):
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _auth_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("authentication failed", extra={"reason": str(exc)})
    if isinstance(exc, TokenExpired):
        kind = ProblemType.token_expired
    elif isinstance(exc, TokenMissing):
        kind = ProblemType.token_missing
    else:
        kind = ProblemType.token_invalid
    # RFC 6750 3.1: a request with no credentials (or another scheme's) gets no error code.
    challenge = "Bearer" if kind is ProblemType.token_missing else 'Bearer error="invalid_token"'
    return problem(
        401,
        f"Invalid or missing bearer token: {exc}.",
        kind=kind,
        headers={"WWW-Authenticate": challenge},
    )


async def _auth_unavailable(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthUnavailable)
    log.error("token keys unavailable", extra={"reason": str(exc)})
    metrics.unavailable("token_keys")
    return problem(
        503,
        "Token verification keys are unavailable; try again shortly.",
        headers={"Retry-After": str(exc.retry_after)},
    )


POOL_EXHAUSTED = (
    "No database connection was free in time (DB_POOL_SIZE + DB_MAX_OVERFLOW, all busy for "
    "DB_POOL_TIMEOUT_SECONDS)"
)


async def _pool_exhausted(_: Request, exc: Exception) -> JSONResponse:
    """Every pooled connection busy: the database may be fine; the instance is overloaded
    (or its pool too small for its load), which an operator must tell from an outage."""
    log.error("database pool exhausted", extra={"error_type": type(exc).__name__})
    metrics.unavailable("pool")
    return problem(
        503, f"{POOL_EXHAUSTED}; try again shortly.", headers={"Retry-After": RETRY_AFTER_SECONDS}
    )


async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    # The driver's first line tells a refusal from a reset or a timeout (never the statement).
    log.error(
        "database unavailable",
        extra={
            "error_type": type(exc).__name__,
            "reason": failure_reason(exc),
        },
    )
    metrics.unavailable("database")
    return problem(
        503,
        "The database is unavailable; try again shortly.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


COMMIT_UNANSWERED = (
    "The connection to the database was lost while the change was being committed: it may "
    "have been saved. Reload before retrying."
)


async def _commit_unanswered(_: Request, exc: Exception) -> JSONResponse:
    """Not "try again": the change may be saved, and a toggle retried blindly would undo it
    (a create with its Idempotency-Key can be retried as is: it replays if it was saved)."""
    log.error(
        "database connection lost during commit: the change may have been saved",
        extra={
            "error_type": type(exc).__name__,
            "reason": failure_reason(exc),
            "commit_uncertain": True,
        },
    )
    metrics.unavailable("database")
    return problem(503, COMMIT_UNANSWERED, headers={"Retry-After": RETRY_AFTER_SECONDS})


def is_timeout(exc: BaseException) -> bool:
    """PostgreSQL cancelled the statement: the database answered, late, not unreachable."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) == QUERY_CANCELED


async def _database_timeout(_: Request, exc: Exception) -> JSONResponse:
    orig = getattr(exc, "orig", None)
    log.error(
        "database statement timed out",
        extra={
            "error_type": type(orig).__name__,
            "sqlstate": QUERY_CANCELED,
            # `canceling statement due to statement timeout` (or `... user request`).
            "reason": failure_reason(exc),
        },
    )
    metrics.unavailable("db_timeout")
    return problem(
        503,
        "The database did not answer in time; try again shortly.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # The traceback's database errors say their first line only (observability.logging).
    log.exception("unhandled error", exc_info=exc, extra={"error_type": type(exc).__name__})
    return problem(500, "An unexpected error occurred.")


# SQLSTATEs of a transaction PostgreSQL rolled back to settle a collision with another one
# (deadlock_detected, serialization_failure): nothing was written, and a retry can succeed.
_COLLISIONS = frozenset({"40P01", "40001"})


def is_collision(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) in _COLLISIONS


async def _collision(_: Request, exc: Exception) -> JSONResponse:
    orig = getattr(exc, "orig", None)
    log.warning(
        "transaction rolled back by the database",
        extra={"sqlstate": getattr(orig, "pgcode", None)},
    )
    return problem(
        503,
        "The change collided with a concurrent one and was rolled back; retry it.",
        headers={"Retry-After": "1"},
    )


def is_disconnect(exc: BaseException) -> bool:
    """A lost or unreachable database, as opposed to a bug or a constraint violation."""
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if commit_unanswered(exc):
        return await _commit_unanswered(request, exc)
    if is_collision(exc):
        return await _collision(request, exc)
    if is_timeout(exc):  # an OperationalError too, but not a lost database
        return await _database_timeout(request, exc)
    if is_disconnect(exc):
        return await _database_unavailable(request, exc)
    return await _unexpected(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as problem+json, and document them that way in /openapi.json."""
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Typed as returning a Response; for None, Starlette sends nothing (as for a WebSocket's).
    app.add_exception_handler(BodyNotReceived, _body_not_received)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(AuthUnavailable, _auth_unavailable)
    app.add_exception_handler(PoolTimeoutError, _pool_exhausted)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
    install_problem_docs(app)
