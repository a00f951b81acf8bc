"""Request bodies read as I-JSON (RFC 7493): an object names each member once; and a body
that never came whole told apart from one that is not JSON.

`json.loads` keeps the last of repeated keys, so `{"title": "a", "title": "b"}` was stored as
"b", while a proxy, a firewall or a log reading the same bytes may take "a". Such a body is
refused instead (400, `service.errors`), by the route class every router with a body uses.

A body whose client closed the connection before its end, or that the server answered in the
app's place (`service.httpserver`: a 408 at its time limit, a 400 for broken chunked framing,
a 413 past the chunked bound), ends in a disconnect, which FastAPI's reading of the body
turned into its 400 "error parsing the body": logged, traced and counted as the client's bad
JSON, though the client got the server's answer or nothing. It is `BodyNotReceived` instead
(`service.errors`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

# A longer key is not repeated back to the client.
_KEY_SHOWN_MAX = 64

# In the request's ASGI `state`: the status the server (service.httpserver) sent in the app's
# place before its body ended (408 at the body's time limit, 400 for a malformed chunked body,
# 413 past the chunked bound); the app's request sees a disconnect.
SERVER_ANSWERED = "server_answered"


class DuplicateKey(json.JSONDecodeError):
    """A decode error, so FastAPI reports it as it does any body that is not JSON."""

    def __init__(self, key: str) -> None:
        named = f" {json.dumps(key)}" if len(key) <= _KEY_SHOWN_MAX else ""
        super().__init__(f"duplicate key{named}: an object may name each key once", "", 0)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def loads(body: bytes | str) -> Any:
    """`json.loads` (UTF-8, -16 or -32, as RFC 8259 readers may accept), refusing repeated
    keys at any depth."""
    return json.loads(body, object_pairs_hook=_unique_keys)


class BodyNotReceived(HTTPException):
    """The body ended before it was whole: the server answered in the app's place
    (`answered`: the status the client got, 408, 400 or 413), or the client closed the connection
    (`answered` is None).

    An HTTPException, because FastAPI passes one raised by the body's reading on as it is,
    where it turns any other exception into its 400."""

    def __init__(self, *, answered: int | None) -> None:
        super().__init__(answered or 408, "The request body was not received.")
        self.answered = answered


class JsonBodyRequest(Request):
    async def body(self) -> bytes:
        try:
            return await super().body()
        except ClientDisconnect:
            answered = self.scope.get("state", {}).get(SERVER_ANSWERED)
            raise BodyNotReceived(answered=answered) from None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


# Methods whose routes change something: they act only on a request received whole, and their
# bodies are bounded and typed (service.middleware.BodyGuardMiddleware).
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class JsonBodyRoute(APIRoute):
    """Reads the body with `loads` (FastAPI parses it with `request.json()`), and a body cut
    short as `BodyNotReceived`.

    A write route that takes no body (a DELETE) reads whatever was sent and drops it before
    it acts: FastAPI's handler would act at once, and a client whose body then never came
    whole was told the server's 408 about a change that was made all the same. A read keeps
    FastAPI's handler as it is."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            if not (self.methods or set()) & WRITE_METHODS:
                return handler

            async def received_whole(request: Request) -> Response:
                await JsonBodyRequest(request.scope, request.receive).body()
                return await handler(request)

            return received_whole

        async def read_unique_keys(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return read_unique_keys
