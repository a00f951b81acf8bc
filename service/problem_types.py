"""The kinds of problem an error response can report: one stable `type` URI each, and the
RFC 9457 body that reports one.

A client branches on `type` (never on the English `detail`). The README's table of problem
types is checked against this list by the tests.

The body's shape is built here, free of any web framework, for both writers of errors: the
app's handlers (`service.errors.problem`) and the HTTP server's own refusals, written outside
any request (`service.httpserver`).
"""

from __future__ import annotations

import json
from enum import Enum
from http import HTTPStatus
from typing import Any

# A tag URI (RFC 4151): stable, and by design not something a client fetches.
PROBLEM_TYPE_BASE = "tag:todo-api,2026:problems/"
PROBLEM_JSON = "application/problem+json"


class ProblemType(Enum):
    """(slug, status, title, when a client meets it and what it should do)."""

    validation = (
        "validation",
        400,
        "Invalid input",
        "The body is not JSON, or a field is out of bounds; `errors` lists each field.",
    )
    malformed_request = (
        "malformed-request",
        400,
        "Malformed request",
        "The HTTP server could not parse the request (a broken request line or header, a "
        "malformed `Content-Length`, broken chunked framing), and closed the connection: the "
        "same bytes fail again; fix the client (or the proxy) that sent them.",
    )
    token_missing = (
        "token-missing",
        401,
        "Missing token",
        "No `Authorization: Bearer` header: sign in, get a token, send it.",
    )
    token_invalid = (
        "token-invalid",
        401,
        "Invalid token",
        "Bad signature, issuer, audience or format: get a new token; retrying will not help.",
    )
    token_expired = (
        "token-expired",
        401,
        "Token expired",
        "The token's `exp` has passed: fetch a fresh token and retry once.",
    )
    user_mismatch = (
        "user-mismatch",
        403,
        "Wrong user",
        "The token's `sub` is not the `{user_id}` in the URL.",
    )
    not_found = (
        "not-found",
        404,
        "Not found",
        "No such task or tag for this user (or no such route).",
    )
    method_not_allowed = (
        "method-not-allowed",
        405,
        "Method not allowed",
        "The route exists but not with this HTTP method.",
    )
    request_timeout = (
        "request-timeout",
        408,
        "Request timeout",
        "The request head or body did not arrive in time (`REQUEST_HEAD_TIMEOUT_SECONDS`, "
        "`REQUEST_BODY_TIMEOUT_SECONDS`), and the HTTP server closed the connection: retry "
        "on a new one.",
    )
    idempotency_conflict = (
        "idempotency-conflict",
        409,
        "Idempotency-Key conflict",
        "The `Idempotency-Key` was used with another body, or its first request is still "
        "running: use a new key, or retry later.",
    )
    tag_conflict = (
        "tag-conflict",
        409,
        "Tag conflict",
        "Another of the user's tags has that name (names ignore case), or the user has the "
        "maximum number of tags: pick another name, or delete unused tags.",
    )
    precondition_failed = (
        "precondition-failed",
        412,
        "Precondition failed",
        "`If-Match` does not match the task's current `ETag`: reload the task and retry. (Or "
        "`If-None-Match` lists that `ETag`, or `*`, on a write.)",
    )
    body_too_large = (
        "body-too-large",
        413,
        "Body too large",
        "The body is larger than `MAX_BODY_BYTES`.",
    )
    unsupported_media_type = (
        "unsupported-media-type",
        415,
        "Unsupported media type",
        "The body is not `application/json`.",
    )
    not_acceptable = (
        "not-acceptable",
        406,
        "Not acceptable",
        "The endpoint cannot answer in a type the `Accept` header allows (the change feed "
        "is `text/event-stream` only).",
    )
    rate_limited = (
        "rate-limited",
        429,
        "Too many requests",
        "Slow down: retry after `Retry-After` seconds.",
    )
    request_head_too_large = (
        "request-head-too-large",
        431,
        "Request header fields too large",
        "The request line and headers together are larger than `MAX_REQUEST_HEAD_BYTES`, and "
        "the HTTP server closed the connection: send fewer or smaller headers.",
    )
    internal = (
        "internal",
        500,
        "Internal error",
        "A bug on the server; the `X-Request-ID` finds it in the logs.",
    )
    unavailable = (
        "unavailable",
        503,
        "Service unavailable",
        "The database or the token keys are unreachable, the database did not answer in "
        "time (`DB_STATEMENT_TIMEOUT_MS`), the database rolled the change back to settle a "
        "collision with a concurrent one, or the server stopped before the request "
        "finished: retry after `Retry-After` seconds. When the connection was lost during a "
        "write's commit, or the server stopped while it was committing, `detail` says the "
        "change may have been saved: reload before retrying.",
    )

    def __init__(self, slug: str, status: int, title: str, description: str) -> None:
        self.slug = slug
        self.status = status
        self.title = title
        self.description = description

    @property
    def uri(self) -> str:
        return PROBLEM_TYPE_BASE + self.slug


# The type of an error that only has a status (Starlette's own 404/405/413...).
BY_STATUS: dict[int, ProblemType] = {
    400: ProblemType.validation,
    401: ProblemType.token_invalid,
    403: ProblemType.user_mismatch,
    404: ProblemType.not_found,
    405: ProblemType.method_not_allowed,
    408: ProblemType.request_timeout,
    409: ProblemType.idempotency_conflict,
    412: ProblemType.precondition_failed,
    413: ProblemType.body_too_large,
    415: ProblemType.unsupported_media_type,
    429: ProblemType.rate_limited,
    431: ProblemType.request_head_too_large,
    500: ProblemType.internal,
    503: ProblemType.unavailable,
}


def problem_body(status: int, detail: str, *, kind: ProblemType | None = None) -> dict[str, Any]:
    """The members every error body has: `type` and `title` of `kind` (by default the
    status's, BY_STATUS), else `about:blank` and the status's phrase; `status`; `detail`."""
    kind = kind or BY_STATUS.get(status)
    return {
        "type": kind.uri if kind else "about:blank",
        "title": kind.title if kind else HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }


def problem_json(kind: ProblemType, detail: str) -> bytes:
    """`problem_body` of `kind`, encoded as the app's responses encode theirs (Starlette's
    JSONResponse: compact, UTF-8), for a writer that has no response class to do it."""
    body = problem_body(kind.status, detail, kind=kind)
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
