"""Request bodies read as I-JSON (RFC 7493): an object names each member once.

`json.loads` keeps the last of repeated keys, so `{"title": "a", "title": "b"}` was stored as
"b", while a proxy, a firewall or a log reading the same bytes may take "a". Such a body is
refused instead (400, `service.errors`), by the route class every router with a body uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# A longer key is not repeated back to the client.
_KEY_SHOWN_MAX = 64


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


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JsonBodyRoute(APIRoute):
    """Reads the body with `loads`: FastAPI parses it with `request.json()`. A route without
    a body keeps FastAPI's handler as it is."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def read_unique_keys(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return read_unique_keys
