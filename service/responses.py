"""JSON responses built inside the endpoint's own worker thread.

Left to FastAPI, the result of a sync endpoint is validated and serialized in another
thread-pool round trip while the request still holds its pooled connection (and, for a write,
its row locks until the commit). Under load every thread-pool token can be held by requests
queued behind that connection or those locks: a deadlock that only the pool timeout breaks,
with 503s. Endpoints therefore return ready-made responses; `response_model` stays on the
route for the OpenAPI document.

URLs put into headers and bodies are built here too, with every path parameter
percent-encoded: Starlette puts a parameter into a URL as it is, and a user id may hold a
space, `?`, `#`, `%` or non-ASCII characters.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.datastructures import URL


def json_response(
    body: bytes | BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = body.model_dump_json().encode() if isinstance(body, BaseModel) else body
    return Response(
        content, status_code=status_code, headers=headers, media_type="application/json"
    )


def _encoded(params: dict[str, Any]) -> dict[str, str]:
    return {key: quote(str(value), safe="") for key, value in params.items()}


def url_for(request: Request, name: str, /, **path_params: Any) -> URL:
    """The absolute URL of route `name`, as a client can follow it."""
    return request.url_for(name, **_encoded(path_params))


def url_path_for(request: Request, name: str, /, **path_params: Any) -> str:
    """The path of route `name`, for a client that resolves it against this API's origin."""
    return str(request.app.url_path_for(name, **_encoded(path_params)))


def next_page_link(request: Request, *, after: str, limit: int) -> str:
    """The `Link` header to a list's next page: this request's URL with `after` and `limit`
    set, `offset` removed, and the rest of its query string as the client sent it.
    `request.url` encodes only `?`, `#` and `\\` of the decoded path, so the path is quoted
    again from the scope: whole, since no segment can hold a `/` (a `%2F` is decoded before
    routing)."""
    path = quote(request.scope.get("root_path", "") + request.scope["path"])
    url = request.url.replace(path=path).include_query_params(after=after, limit=limit)
    return f'<{url.remove_query_params("offset")}>; rel="next"'
