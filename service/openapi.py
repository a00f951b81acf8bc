"""The problem+json error shape, as OpenAPI documents it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from service.limits import REQUEST_ID_MAX
from service.problem_types import PROBLEM_JSON, PROBLEM_TYPE_BASE

# The change feed's single-use `?ticket=`, an alternative to the bearer token there.
STREAM_TICKET_SCHEME = "StreamTicket"
_STREAM_TICKET = {
    "type": "apiKey",
    "in": "query",
    "name": "ticket",
    "description": "A single-use ticket from `POST /api/{user_id}/events/tickets`, for "
    "EventSource, which cannot send an `Authorization` header.",
}


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error response."""

    type: str = Field(
        default="about:blank",
        description=f"What kind of problem: `{PROBLEM_TYPE_BASE}<kind>` (see the README's "
        "table), or `about:blank`. Branch on this, not on `detail`.",
        examples=[f"{PROBLEM_TYPE_BASE}token-expired"],
    )
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


_DESCRIPTIONS = {
    400: "Invalid input (validation errors are listed in `errors`), such as a query parameter "
    "this operation does not list, or one that is not repeatable given twice",
    401: "Missing or invalid bearer token",
    403: "The token belongs to another user",
    404: "No such task for this user",
    409: "Conflict",
    412: "If-Match does not match the task's current ETag, or If-None-Match lists it (or `*`)",
    413: "Request body too large",
    415: "Request body is not JSON, or is compressed",
    429: "Rate limit exceeded; retry after Retry-After seconds (see the RateLimit headers)",
    503: "Database or token keys unavailable, a change rolled back by a collision, or the "
    "server stopping; retry after Retry-After seconds",
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


# Response headers, documented once; routes name the ones they send. `required`: on every
# response the header is documented for, so generated clients type it as always there.
_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "required": True,
        "description": "The task's version; send it back in `If-Match` to update safely.",
        "schema": {"type": "string", "examples": ['"7-3"']},
    },
    "Location": {
        "required": True,
        "description": "URL of the created task or tag.",
        "schema": {"type": "string", "format": "uri"},
    },
    "Link": {
        "description": 'RFC 8288: `<url>; rel="next"` on a list while more remain; '
        '`<url>; rel="next-occurrence"` on a recurring task that has made its next one.',
        "schema": {"type": "string"},
    },
    "X-Total-Count": {
        "required": True,
        "description": "How many tasks match the filters, over all pages.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an earlier request with the "
        "same `Idempotency-Key`.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "X-Request-ID": {
        "required": True,
        "description": "The request's id (the client's if well-formed), also in the logs and "
        "the audit log.",
        "schema": {"type": "string", "maxLength": REQUEST_ID_MAX},
    },
    "X-Trace-Id": {
        "description": "The OpenTelemetry trace id of the request.",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    },
    "RateLimit-Policy": {
        "description": 'IETF draft: the request\'s rate-limit policy, `"<name>";q=<quota>;'
        "w=<window s>` (with rate limiting on).",
        "schema": {"type": "string", "examples": ['"write";q=120;w=60']},
    },
    "RateLimit": {
        "description": 'IETF draft: what remains of it, `"<name>";r=<remaining>;t=<s to reset>`.',
        "schema": {"type": "string", "examples": ['"write";r=117;t=42']},
    },
    "Retry-After": {
        "required": True,
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "required": True,
        "description": 'RFC 6750 challenge: `Bearer error="invalid_token"`, or `Bearer` when '
        "no bearer token was sent.",
        "schema": {"type": "string"},
    },
}

# The probes are not traced (observability.tracing.HEALTH_PATHS): no X-Trace-Id.
_UNTRACED_OPERATIONS = {"healthz", "readyz"}


def with_headers(*names: str) -> dict[str, Any]:
    """A `responses` entry documenting the headers a success response carries."""
    return {"headers": {name: _HEADERS[name] for name in names}}


def operation_id(route: APIRoute) -> str:
    """`list_tasks` -> `listTasks`: names that read well in generated clients."""
    head, *rest = route.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _problem_docs(schema: dict[str, Any]) -> None:
    """Rewrite FastAPI's generated schema in place to match what the handlers send.

    Validation failures are 400 (never 422), and error bodies are application/problem+json
    (FastAPI files every `model` under the route's own media type, application/json).
    """
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            responses.pop("422", None)
            # Explicit on every route: `[]` says "no token" rather than "not documented".
            operation.setdefault("security", [])
            untraced = operation.get("operationId") in _UNTRACED_OPERATIONS
            for code, response in responses.items():
                content = response.get("content", {})
                if code[:1] in {"4", "5"} and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
                headers = response.setdefault("headers", {})
                names = ["X-Request-ID"] + ([] if untraced else ["X-Trace-Id"])
                # The body guard's 413 and 415 are answered before any limit is counted.
                if path.startswith("/api/") and code not in {"413", "415"}:
                    names += ["RateLimit-Policy", "RateLimit"]
                if code == "401":
                    names.append("WWW-Authenticate")
                if code in {"429", "503"}:
                    names.append("Retry-After")
                for name in names:
                    headers.setdefault(name, _HEADERS[name])
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[STREAM_TICKET_SCHEME] = _STREAM_TICKET
    schemas = components.get("schemas", {})
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
