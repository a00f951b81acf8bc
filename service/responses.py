"""JSON responses built inside the endpoint's own worker thread.

Left to FastAPI, the result of a sync endpoint is validated and serialized in another
thread-pool round trip while the request still holds its pooled connection (and, for a write,
its row locks until the commit). Under load every thread-pool token can be held by requests
queued behind that connection or those locks: a deadlock that only the pool timeout breaks,
with 503s. Endpoints therefore return ready-made responses; `response_model` stays on the
route for the OpenAPI document.
"""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel


def json_response(
    body: bytes | BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    content = body.model_dump_json().encode() if isinstance(body, BaseModel) else body
    return Response(
        content, status_code=status_code, headers=headers, media_type="application/json"
    )
