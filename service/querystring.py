"""Query strings that name only the route's own parameters, each scalar one once.

FastAPI ignores a name it was not told of, so `?stauts=open` (a typo) answered the unfiltered
list, and of `?limit=1&limit=2` it reads one value while a proxy or a log may read the other.
Both are refused instead: 400, `errors` naming `query.<name>`, reported with the query's other
validation errors and in the same place, after the route's dependencies (the token: a missing
one is still 401).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from fastapi import Request, Response
from fastapi._compat import field_annotation_is_sequence
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.params import Query
from fastapi.routing import APIRoute

from service.text import control_error

# A longer name, or one with control characters, is not repeated back to the client.
_NAME_SHOWN_MAX = 64

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class _Refused(Exception):
    """Raised in place of the endpoint: its dependencies and parameters were all valid."""


async def _refuse(**_: Any) -> NoReturn:
    raise _Refused


def _unshown(name: str) -> str:
    if not name:
        return "no name"
    if len(name) > _NAME_SHOWN_MAX:
        return f"a name over {_NAME_SHOWN_MAX} characters"
    return "control characters in its name"


@dataclasses.dataclass(frozen=True, slots=True)
class QueryNames:
    """A route's query parameter names, from its declared parameters and its dependencies'."""

    names: frozenset[str]
    repeatable: frozenset[str]

    @classmethod
    def of(cls, route: APIRoute) -> QueryNames:
        fields = [f for f in get_flat_params(route.dependant) if isinstance(f.field_info, Query)]
        return cls(
            frozenset(f.alias for f in fields),
            frozenset(
                f.alias for f in fields if field_annotation_is_sequence(f.field_info.annotation)
            ),
        )

    def accepts(self, request: Request) -> bool:
        """Every name declared, none repeated: the one check on the request path (when false,
        `errors` looks closer: a repeatable parameter may be repeated)."""
        params = request.query_params
        return self.names.issuperset(params.keys()) and len(params) == len(params.multi_items())

    def errors(self, request: Request) -> list[dict[str, Any]]:
        """One error per unknown name and per scalar parameter given more than once."""
        takes = ", ".join(sorted(self.names)) or "no query parameters"
        counted: dict[str, int] = {}
        for name, _ in request.query_params.multi_items():
            counted[name] = counted.get(name, 0) + 1
        found: list[dict[str, Any]] = []
        for name, count in counted.items():
            if name not in self.names:
                message = f"unknown parameter; this endpoint takes {takes}"
                loc: tuple[str, ...] = ("query", name)
                if not name or len(name) > _NAME_SHOWN_MAX or control_error(name):
                    loc = ("query",)
                    message = f"a parameter with {_unshown(name)}: {message}"
                found.append({"type": "unknown_parameter", "loc": loc, "msg": message})
            elif count > 1 and name not in self.repeatable:
                message = "given more than once; it takes one value"
                found.append({"type": "repeated_parameter", "loc": ("query", name), "msg": message})
        return found


class KnownQueryRoute(APIRoute):
    """Refuses a query parameter the route does not declare, and a scalar one given twice.

    The names are the route's declared ones, read once when the route is made. A request
    whose query has others is served by a twin of the route's handler whose endpoint raises:
    the body, the dependencies (the token, with its 401) and the declared parameters are
    handled exactly as on the real one, then the query's errors are added to theirs.
    """

    query_names: QueryNames | None = None
    _refusing: Handler | None = None

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        if self.query_names is None or self._refusing is None:
            # The first call, from APIRoute.__init__: the route's own dependant. FastAPI
            # builds the handler again for each inclusion of its router, the same endpoint
            # with the include's `dependencies=` first (the app includes none: they would
            # not run on the refusing twin).
            self.query_names = QueryNames.of(self)
            served = self.dependant
            self.dependant = dataclasses.replace(served, call=_refuse)
            try:
                self._refusing = super().get_route_handler()
            finally:
                self.dependant = served
        names, refusing = self.query_names, self._refusing

        async def checked(request: Request) -> Response:
            if (
                not request.scope["query_string"]
                or names.accepts(request)
                or not (errors := names.errors(request))  # a repeatable one repeated
            ):
                return await handler(request)
            try:
                await refusing(request)
            except RequestValidationError as exc:
                raise RequestValidationError([*exc.errors(), *errors], body=exc.body) from None
            except _Refused:
                raise RequestValidationError(errors) from None
            raise AssertionError("the refusing handler returned")  # pragma: no cover

        return checked
