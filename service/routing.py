"""The router of every feature: its GET routes answer HEAD too; and every route of an app,
those of included routers too (`every_route`), for what walks them (errors, tracing, tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fastapi import APIRouter
from starlette.routing import BaseRoute

F = TypeVar("F", bound=Callable[..., Any])
_GET_ONLY: set[Callable[..., Any]] = set()


def get_only(endpoint: F) -> F:
    """No HEAD twin for this GET (put it under the route decorator): a GET that writes, as the
    verify endpoint records what it found, would write on a HEAD too, which must be safe."""
    _GET_ONLY.add(endpoint)
    return endpoint


class Router(APIRouter):
    """An APIRouter whose GET routes also answer HEAD (RFC 9110 9.3.2: GET without the body).

    FastAPI answers only the methods a route lists (405 otherwise), and a HEAD listed on the
    GET route itself would be a second OpenAPI operation with the same operationId. So each
    GET gets a twin route for HEAD, hidden from the document: same endpoint, dependencies (the
    token is checked the same way) and response, whose body Starlette leaves unsent. A GET
    whose body never ends (the change feed) or that writes (verify) is marked `get_only`.
    """

    def add_api_route(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().add_api_route(path, endpoint, **kwargs)
        methods = kwargs.get("methods") or ["GET"]
        if "GET" in {method.upper() for method in methods} and endpoint not in _GET_ONLY:
            head = {**kwargs, "methods": ["HEAD"], "include_in_schema": False}
            super().add_api_route(path, endpoint, **head)


def every_route(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route of the app, those of included routers too: FastAPI keeps an included
    router's routes on that router (`original_router`), not in the app's own list."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is None:
            yield route
        else:
            yield from every_route(included.routes)
