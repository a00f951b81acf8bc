"""Per-request observability: the access line, the request's log context, and 5xx errors
recorded on the request's span."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from opentelemetry.instrumentation.utils import suppress_instrumentation
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observability.logging import bind_request_state, unbind_request_state
from observability.tracing import (
    CLIENT_CLOSED,
    HEALTH_PATHS,
    record_client_closed,
    record_server_error,
)
from service.jsonbody import SERVER_ANSWERED

access_log = logging.getLogger("service.access")

# The access line's status for a request whose client closed the connection before it was
# answered (its body cut short), when nothing was sent: nginx's 499, "client closed request".
CLIENT_CLOSED_REQUEST = 499

Handler = Callable[[Request, Exception], Any]


class RequestLogMiddleware:
    """Binds the request to its log lines and writes one access line when it is answered.

    Its status is the answer's (the server's own, where it answered in the app's place); with
    no answer begun, 499 if the app saw the client's
    disconnect (a body cut short: `error_type` on the line and `error.type` on the span say
    so), else 500 (an exception escaped).

    Added last, so it is the outermost of the app's middleware; the server span is already
    current. Probes log at DEBUG and run with instrumentation suppressed (no database spans).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        token = bind_request_state(state)
        probe = scope["path"] in HEALTH_PATHS
        status: int | None = None
        client_gone = False
        started = perf_counter()

        async def receive_and_observe() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if probe:
                with suppress_instrumentation():
                    await self.app(scope, receive_and_observe, send_and_observe)
            else:
                await self.app(scope, receive_and_observe, send_and_observe)
        finally:
            error_type: str | None = None
            if answered := state.get(SERVER_ANSWERED):
                # The server answered in the app's place (service.httpserver) and dropped
                # the app's answer: a read that takes no body (a GET sent with one) answers
                # as if all was well.
                status = answered
            elif status is None:  # no answer begun
                if client_gone:
                    status, error_type = CLIENT_CLOSED_REQUEST, CLIENT_CLOSED
                    record_client_closed()
                else:
                    status = 500  # an exception escaped (or uvicorn answers 500 for the app)
            level = logging.DEBUG if probe else logging.INFO
            if access_log.isEnabledFor(level):
                duration_ms = round((perf_counter() - started) * 1000, 3)
                route = route_template(scope)
                method = scope["method"]
                extra = {
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": duration_ms,
                    # The client's (per TRUSTED_PROXIES, as the audit log's client_ip).
                    "client_ip": client[0] if (client := scope.get("client")) else None,
                }
                if error_type is not None:
                    extra["error_type"] = error_type
                access_log.log(
                    level, "%s %s %s", method, route or scope["path"], status, extra=extra
                )
            unbind_request_state(token)


def route_template(scope: Scope) -> str | None:
    """The route's template, as the server span's `http.route` names it: the route that
    answered or, for an answer given before routing (a CORS preflight, a 413 or 415 from
    the body guard), the route the path matches, as the FastAPI instrumentation finds it
    (a full match, else the last one that matches but for the method). None off every route.
    """
    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        return str(route)
    routes = getattr(scope.get("app"), "routes", None)
    if not routes:
        return None
    found: str | None = None
    for candidate in iter_route_contexts(routes):
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return candidate.path
        if match is Match.PARTIAL:
            found = candidate.path
    return found


def _observed(handler: Handler, *, record: bool) -> Callable[[Request, Exception], Awaitable[Any]]:
    is_async = inspect.iscoroutinefunction(handler)

    async def observed(request: Request, exc: Exception) -> Any:
        # Starlette's outermost error handler runs outside RequestLogMiddleware: bind again.
        token = bind_request_state(request.scope.setdefault("state", {}))
        try:
            if is_async:
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            if record and getattr(response, "status_code", 0) >= 500:
                record_server_error(exc)
            return response
        finally:
            unbind_request_state(token)

    return observed


def observe_exception_handlers(app: FastAPI) -> None:
    """A handler that answers 5xx records the exception on the span; a 4xx does not.

    The `Exception`/500 handler is left to the FastAPI instrumentation, which already records
    what reaches Starlette's ServerErrorMiddleware.
    """
    for key, handler in list(app.exception_handlers.items()):
        unhandled = key in (500, Exception)
        app.exception_handlers[key] = _observed(handler, record=not unhandled)
