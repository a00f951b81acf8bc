"""The problem+json error shape, as OpenAPI documents it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


_DESCRIPTIONS = {
    400: "Invalid input (validation errors are listed in `errors`)",
    401: "Missing or invalid bearer token",
    403: "The token belongs to another user",
    404: "No such task for this user",
    409: "Conflict",
    412: "If-Match does not match the task's current ETag",
    413: "Request body too large",
    415: "Request body is not JSON",
    503: "Database or token keys unavailable; retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route, always with 500 and 503 (any route can meet them)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in (*codes, 500, 503):
        out[code] = {
            "model": Problem,
            "description": _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
            "content": {"application/problem+json": {}},
        }
    return out
