"""ASGI middleware: the request id every response carries and every audit row stores."""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_MAX = 128


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= REQUEST_ID_MAX and value.isascii() and value.isprintable()


class RequestIdMiddleware:
    """Keeps a well-formed client `X-Request-ID`, else makes one, and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, raw in scope["headers"]:
            if name == b"x-request-id":
                candidate = raw.decode("latin-1")
                if valid_request_id(candidate):
                    request_id = candidate
                break
        if request_id is None:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class BodyGuardMiddleware:
    """Bounds request bodies (413 without reading the rest) and accepts only JSON (415).

    Both render as problem+json, like every other error.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length_header = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        has_body = chunked or (length_header is not None and length_header.strip() != b"0")
        limit = self.max_body_bytes
        too_large = f"The request body is larger than {limit} bytes."
        if length_header is not None:
            try:
                declared = int(length_header)
            except ValueError:
                declared = -1
            if declared < 0:
                await problem(400, "Invalid Content-Length header.")(scope, receive, send)
                return
            if declared > limit:
                await problem(413, too_large)(scope, receive, send)
                return
        if has_body and not _is_json(content_type):
            detail = "The request body must be JSON (Content-Type: application/json)."
            await problem(415, detail)(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPException from a body read; the handler renders it.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)
