"""ASGI middleware: the request id every response carries and every audit row stores, CORS
with refused preflights as problems, the body guard (413, 415), unhandled errors as 500s that
keep CORS and the request id, and the trusted proxies' forwarded headers."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from observability import metrics
from observability.logging import mark_answered
from observability.tracing import PROXY_PEER, record_server_error
from service.errors import RETRY_AFTER_SECONDS, problem
from service.jsonbody import WRITE_METHODS
from service.limits import REQUEST_ID_MAX

log = logging.getLogger("service.errors")

REQUEST_ID_HEADER = "x-request-id"


# What Starlette's preflight check names, and the request header each name stands for.
_PREFLIGHT_HEADERS = {
    "origin": "origin",
    "method": "access-control-request-method",
    "headers": "access-control-request-headers",
    "private-network": "access-control-request-private-network",
}


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in problem+json like every other
    error (Starlette answers text/plain "Disallowed CORS origin, method")."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ").split(", ")
        errors = [
            {"field": f"header.{_PREFLIGHT_HEADERS.get(name, name)}", "message": "Not allowed."}
            for name in refused
        ]
        headers = {
            key: value
            for key, value in response.headers.items()
            if key not in ("content-length", "content-type")
        }
        return problem(
            400, "The CORS preflight request is refused.", headers=headers, errors=errors
        )


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

    Both render as problem+json, like every other error. A DELETE's body too: it takes none,
    but reads one sent (`service.jsonbody`) before it acts.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
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
                error = {"field": "header.content-length", "message": "Not a byte count."}
                await problem(400, "Invalid Content-Length header.", errors=[error])(
                    scope, receive, send
                )
                return
            if declared > limit:
                await problem(413, too_large)(scope, receive, send)
                return
        not_json = "The request body must be JSON (Content-Type: application/json)."
        # A chunked body may end empty, which is no body (a proxy passes on the body stream of
        # a DELETE it got, with no Content-Type): it is refused at its first byte instead.
        wrong_type = has_body and not _is_json(content_type)
        if wrong_type and not chunked:
            await problem(415, not_json)(scope, receive, send)
            return
        codings = {  # a list, maybe over several lines (RFC 9110 8.4)
            coding.strip().lower()
            for name, value in scope["headers"]
            if name == b"content-encoding"
            for coding in value.decode("latin-1").split(",")
        }
        if has_body and codings - {"", "identity"}:
            # Read as is, a gzip body would be "not valid JSON" (400): the coding is what is
            # unsupported (RFC 9110 15.5.16), and Accept-Encoding says which one is.
            detail = "The request body must not be encoded (Content-Encoding: identity)."
            await problem(415, detail, headers={"Accept-Encoding": "identity"})(
                scope, receive, send
            )
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received and wrong_type:
                    raise HTTPException(415, not_json)  # rendered as the 413 below is
                if received > limit:
                    # FastAPI re-raises HTTPException from a body read; the handler renders it.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)


# In the request's ASGI `state`: the request was cancelled while its worker thread was already
# committing (service.deps), so whether the change was written is unknown.
COMMIT_UNCERTAIN = "commit_uncertain"


class UnhandledErrorMiddleware:
    """Turns an exception no handler took into a problem+json 500 *inside* the middleware
    stack, so the answer still gets CORS headers and `X-Request-ID` (Starlette's own 500
    handler runs outside every middleware, and a browser would report a CORS error).

    A request still running when the server's shutdown timeout runs out is cancelled by
    uvicorn (CancelledError, not an Exception): it is answered 503 with `Retry-After` here,
    its transaction rolled back (service.deps), and the cancellation re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError as exc:
            if started:
                raise
            await self._cancelled(scope, receive, send, exc)
            mark_answered(exc)
            raise
        except Exception as exc:
            if started:
                raise
            record_server_error(exc)
            log.exception("unhandled error", exc_info=exc, extra={"error_type": type(exc).__name__})
            await problem(500, "An unexpected error occurred.")(scope, receive, send)

    async def _cancelled(
        self, scope: Scope, receive: Receive, send: Send, exc: asyncio.CancelledError
    ) -> None:
        uncertain = bool(scope.get("state", {}).get(COMMIT_UNCERTAIN))
        log.warning(
            "request cancelled before it finished: the server is stopping",
            extra={"reason": str(exc) or "cancelled", "commit_uncertain": uncertain},
        )
        metrics.unavailable("shutdown")
        if uncertain:
            detail = (
                "The server stopped while the change was being committed: it may have been "
                "saved. Reload before retrying."
            )
        else:
            detail = "The server stopped before the request finished; nothing was changed."
        response = problem(503, detail, headers={"Retry-After": RETRY_AFTER_SECONDS})
        await response(scope, receive, send)


def _valid_host(value: str) -> bool:
    return (
        0 < len(value) <= 255
        and value.isascii()
        and value.isprintable()
        and not any(c in value for c in " /\\?#@")
    )


class TrustedProxyMiddleware:
    """`X-Forwarded-Proto`, `-For` and `-Host`, believed only from `TRUSTED_PROXIES`.

    uvicorn's ProxyHeadersMiddleware sets the scheme and the client address; this adds the
    host, so that `Location`, `Link` and the audit log's `client_ip` are what the client
    used and was. From any other peer the headers are ignored. Put around the whole stack by
    `serve_behind_proxies`, and the proxy kept in the scope's state as `PROXY_PEER`.
    """

    def __init__(self, app: ASGIApp, trusted: list[str]) -> None:
        self.app = app
        self.proxy = ProxyHeadersMiddleware(
            self._address_or_proxy,  # type: ignore[arg-type]
            trusted_hosts=trusted,
        )
        self.trusted = self.proxy.trusted_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            if client and client[0] in self.trusted:
                scope.setdefault("state", {})[PROXY_PEER] = tuple(client)
                forwarded = [v for k, v in scope["headers"] if k == b"x-forwarded-host"]
                if forwarded:
                    # The nearest proxy's value: the last one it appended or set.
                    host = forwarded[-1].decode("latin-1").split(",")[-1].strip()
                    if _valid_host(host):
                        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [
                            (b"host", host.encode("latin-1"))
                        ]
        await self.proxy(scope, receive, send)  # type: ignore[arg-type]

    async def _address_or_proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """uvicorn takes any text forwarded as the client's host (`unknown`, `<script>`, a
        kilobyte), which would be the audit log's `client_ip`, the rate limiter's key and
        the span's `client.address`: text that is not an IP address stands for the proxy,
        the nearest address known."""
        peer = scope.get("state", {}).get(PROXY_PEER)
        client = scope.get("client")
        if peer is not None and client is not None and not _is_ip_address(client[0]):
            scope["client"] = peer
        await self.app(scope, receive, send)


def _is_ip_address(host: str) -> bool:
    """An IPv4 or IPv6 address, without an IPv6 zone (`%` then any text, to `ipaddress`)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not isinstance(address, ipaddress.IPv6Address) or address.scope_id is None


def serve_behind_proxies(app: Starlette, trusted: list[str]) -> None:
    """`TrustedProxyMiddleware` around the whole stack, the server span's instrumentation
    included: the instrumentation builds the span's `client.*` and `url.scheme` from the
    scope as it starts the span, so they are the client's (the forwarded headers give no
    client port, and the span claims none), with the proxy as `network.peer.*`
    (observability.tracing). Call after `observe_app`, which wraps the stack's builder too:
    the instrumentation expects to find Starlette's own stack inside."""
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return TrustedProxyMiddleware(build(), trusted)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
