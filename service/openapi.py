"""The problem+json error shape, as OpenAPI documents it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

PROBLEM_JSON = "application/problem+json"


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
    429: "Rate limit exceeded; retry after Retry-After seconds (see the RateLimit headers)",
    503: "Database or token keys unavailable; retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route, always with 500 and 503 (any route can meet them);
    a route that takes a token (401) is rate limited (429)."""
    out: dict[int | str, dict[str, Any]] = {}
    limited = (429,) if 401 in codes else ()
    for code in (*codes, *limited, 500, 503):
        out[code] = {
            "model": Problem,
            "description": _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
        }
    return out


def _problem_docs(schema: dict[str, Any]) -> None:
    """Rewrite FastAPI's generated schema in place to match what the handlers send.

    Validation failures are 400 (never 422), and error bodies are application/problem+json
    (FastAPI files every `model` under the route's own media type, application/json).
    """
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for code, response in responses.items():
                content = response.get("content", {})
                if code[:1] in {"4", "5"} and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    schemas = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def install_problem_docs(app: FastAPI) -> None:
    """Serve the rewritten schema at /openapi.json (generated once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _problem_docs(generate())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
