"""The change feed: `GET /api/{user_id}/events` (Server-Sent Events) and its stream tickets.

Each event of the user's audit chain is sent once, in seq order: `id` is its seq, `event` its
action, `data` the same JSON as an item of `GET /audit-events`. A stream first sends what
follows its resume point (`Last-Event-ID`, `?lastEventId=` or `?after=`) from the table, then
waits for the hub to wake it and reads on from its last seq: replay and live are one loop over
the table, so there is no gap and no duplicate between them. A resume point past the user's
newest event (the client's state is from another database, e.g. one reset since) ends the
stream with `resume_point_ahead` instead of waiting for seqs the client believes it has
already seen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from opentelemetry.instrumentation.utils import suppress_instrumentation
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from audit.queries import chain_head_seq, events_after
from audit.schemas import AuditEventPublic, UtcTimestamp
from service.auth import Principal
from service.database import Database
from service.deps import (
    BearerDep,
    CurrentUser,
    PlainDigits,
    SessionDep,
    SettingsDep,
    UnitOfWorkRoute,
    UserIdPath,
    authenticate,
    count_anonymous,
    count_user,
    get_current_user,
    identify,
    plain_digits,
)
from service.events import tickets
from service.events.hub import FeedHub, Subscription
from service.exceptions import (
    AuthError,
    FeedUnavailable,
    Forbidden,
    InvalidInput,
    NotAcceptable,
    TokenExpired,
    TokenMissing,
    TooManyStreams,
)
from service.limits import BIGINT_MAX
from service.openapi import STREAM_TICKET_SCHEME, error_responses
from service.responses import json_response, url_path_for
from service.routing import Router, get_only

log = logging.getLogger("service.events")

router = Router(prefix="/api/{user_id}", tags=["events"], route_class=UnitOfWorkRoute)

# Events read from the table at a time: the most a stream holds in memory.
PAGE_SIZE = 100
# Sent first: how long EventSource waits before reconnecting (milliseconds).
RECONNECT_MS = 2000
# After the shutdown signal, how long a stream has to send its final event.
SHUTDOWN_GRACE_SECONDS = 2.0
END_EVENT = "end"
# The `end` reason for a resume point past the user's newest event; it carries `latest_seq`.
RESUME_POINT_AHEAD = "resume_point_ahead"


class StreamTicket(BaseModel):
    """Open the stream with `GET {stream_url}` before `expires_at`; the ticket works once."""

    ticket: str
    expires_at: UtcTimestamp
    stream_url: str = Field(description="The stream's path with the ticket, for EventSource")


async def get_feed(request: Request) -> FeedHub:
    hub: FeedHub = request.app.state.feed
    return hub


FeedDep = Annotated[FeedHub, Depends(get_feed)]


@router.post(
    "/events/tickets",
    response_model=StreamTicket,
    status_code=status.HTTP_201_CREATED,
    # It reads no body, but one sent must still be JSON and within MAX_BODY_BYTES.
    responses=error_responses(400, 401, 403, 413, 415),
    summary="A single-use ticket to open the change feed from a browser's EventSource",
)
def create_stream_ticket(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    user_id: UserIdPath,
) -> Any:
    issued = tickets.issue(session, user, settings.feed_ticket_ttl_seconds)
    body = StreamTicket(
        ticket=issued.ticket,
        expires_at=issued.expires_at,
        stream_url=f"{url_path_for(request, 'stream_events', user_id=user.user_id)}"
        f"?ticket={issued.ticket}",
    )
    return json_response(body, status.HTTP_201_CREATED, {"Cache-Control": "no-store"})


def _accepts_event_stream(accept: str | None) -> bool:
    if not accept:
        return True
    for part in accept.split(","):
        media, *params = (piece.strip().lower() for piece in part.split(";"))
        if media in {"text/event-stream", "text/*", "*/*"} and not any(
            param.replace(" ", "") in {"q=0", "q=0.0", "q=0.00", "q=0.000"} for param in params
        ):
            return True
    return False


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A resume point the client gave as text, and where: the error names what it sent."""

    value: str | None
    field: str
    name: str


def _start_seq(after: int | None, *last_event_ids: ResumePoint) -> int:
    """`Last-Event-ID` (sent by EventSource when it reconnects) wins over `?lastEventId=`
    (what EventSource polyfills that cannot resend the header put in the URL), which wins
    over `?after=`. An empty one is not given; any other is a seq written as `after` is
    (`05` or ` 5` resumed after 5 where `after=05` was a 400)."""
    for point in last_event_ids:
        if point.value:
            text = point.value
            if not plain_digits(text) or len(text) > 19 or int(text) > BIGINT_MAX:
                raise InvalidInput(
                    f"{point.name} must be the id (a seq) of an event of this feed.",
                    field=point.field,
                )
            return int(text)
    return after or 0


async def stream_caller(request: Request, bearer: BearerDep) -> Principal | None:
    """The bearer token's user, verified before the request's parameters are, as on every
    other route (a 401 first, counted by address); None for a request with a stream ticket
    and no bearer token: the ticket is redeemed after them, so that the request's own
    mistakes do not spend it."""
    if bearer is None:
        if "ticket" in request.query_params:
            return None
        await count_anonymous(request)
        raise TokenMissing("missing bearer token or stream ticket")
    return await authenticate(request, bearer)


CallerDep = Annotated[Principal | None, Depends(stream_caller)]


async def _redeem(
    request: Request, database: Database, user_id: str, ticket: str
) -> tickets.RedeemedTicket:
    # Counted as `authenticate` counts: by address until the ticket proves the user.
    try:
        redeemed = await run_in_threadpool(tickets.redeem, database, ticket, user_id)
    except TokenExpired:
        raise  # a genuine ticket, spent: the client must get a new one, not wait (429)
    except (AuthError, Forbidden):
        await count_anonymous(request)
        raise
    identify(request, redeemed.principal.user_id)
    await count_user(request, redeemed.principal.user_id)
    return redeemed


async def _subscribe(
    request: Request,
    hub: FeedHub,
    user_id: str,
    caller: Principal | None,
    ticket: str | None,
    start: int,
) -> tuple[Principal, Subscription]:
    database: Database = request.app.state.db
    if caller is not None:
        principal = await get_current_user(request, user_id, caller)
        tickets.check_unexpired(principal)
        return principal, hub.subscribe(principal.user_id, start)
    assert ticket is not None  # stream_caller let the request through for its ticket
    redeemed = await _redeem(request, database, user_id, ticket)
    try:
        return redeemed.principal, hub.subscribe(redeemed.principal.user_id, start)
    except (TooManyStreams, FeedUnavailable):
        # Refused for the server's sake: the client may retry later with the same ticket.
        await run_in_threadpool(tickets.give_back, database, redeemed)
        raise


@dataclass(frozen=True, slots=True)
class Page:
    events: list[ServerSentEvent]
    # The chain head's seq, read only when there was nothing to send.
    head: int | None


def _read(
    database: Database, user_id: str, after: int, jaeger_ui_url: str | None, traced: bool
) -> Page:
    """The next page of the user's events, encoded; in a worker thread.

    Only the first read of a stream is traced: the live reads of a stream open for hours
    would otherwise pile up under one server span.
    """

    def read() -> Page:
        with database.unit_of_work() as session:
            rows = events_after(session, user_id, after, PAGE_SIZE)
            # After the events: one committed in between moves the head to its seq (above
            # `after`), so it is sent on the wake-up its notification brings, never refused.
            head = None if rows else chain_head_seq(session, user_id)
        events = [
            ServerSentEvent(
                AuditEventPublic.from_row(row, jaeger_ui_url).model_dump_json(),
                id=str(row["seq"]),
                event=row["action"],
            )
            for row in rows
        ]
        return Page(events, head)

    if traced:
        return read()
    with suppress_instrumentation():
        return read()


def _end(reason: str, **details: Any) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"reason": reason, **details}), event=END_EVENT)


async def _events(
    hub: FeedHub,
    database: Database,
    subscription: Subscription,
    expires_at: float,
    jaeger_ui_url: str | None,
) -> AsyncIterator[ServerSentEvent]:
    traced = True
    try:
        yield ServerSentEvent(retry=RECONNECT_MS)
        while True:
            # Cleared before reading: a commit notified during the read wakes the next wait.
            subscription.clear()
            while subscription.reason is None:
                page = await run_in_threadpool(
                    _read,
                    database,
                    subscription.user_id,
                    subscription.last_seq,
                    jaeger_ui_url,
                    traced,
                )
                traced = False
                for event in page.events:
                    yield event
                    subscription.last_seq = int(event.id or 0)
                if page.head is not None and page.head < subscription.last_seq:
                    # Waiting would skip the events up to the resume point when they come.
                    # Anything committed after the head was read is above it, so the client
                    # misses nothing by resuming from `latest_seq`.
                    yield _end(RESUME_POINT_AHEAD, latest_seq=page.head)
                    return
                if len(page.events) < PAGE_SIZE:
                    break
            if subscription.reason is not None:
                yield _end(subscription.reason)
                return
            remaining = expires_at - time.time()
            if remaining <= 0:
                yield _end("token_expired")
                return
            await subscription.wait(remaining)
    finally:
        hub.unsubscribe(subscription)


class FeedResponse(EventSourceResponse):
    """An SSE response that gives its stream's slot back however it ends, and closes a
    stalled client's stream without an error trace."""

    def __init__(
        self, content: Any, *, hub: FeedHub, subscription: Subscription, **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        # sse_starlette sets `Connection: keep-alive`: HTTP/1.1's default anyway, forbidden in
        # HTTP/2, and sent beside uvicorn's `Connection: close` during the SIGTERM drain.
        del self.headers["Connection"]
        self.hub = hub
        self.subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # The client stopped reading and its buffers are full: it resumes from its
            # last id when it reconnects.
            log.warning(
                "feed client too slow; stream closed",
                extra={"user_id": self.subscription.user_id},
            )
        finally:
            self.hub.unsubscribe(self.subscription)


@router.get(
    "/events",
    response_class=FeedResponse,
    status_code=status.HTTP_200_OK,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-Sent Events: `id` = seq, `event` = action, `data` = the "
            "audit event as JSON; a final `end` event says why the server closed the stream: "
            '`{"reason": "token_expired"}`, `"server_shutdown"` or `"feed_unavailable"` (this '
            "server's listener stopped receiving changes) (reconnect with the last id), "
            'or `{"reason": "resume_point_ahead", "latest_seq": N}` when the resume point is '
            "past the user's newest event N (the client's state is from elsewhere, e.g. a "
            "database since reset): reload the state, then resume from N.",
        },
        **error_responses(400, 401, 403, 406, 429),
    },
    summary="The caller's audit events as they commit (Server-Sent Events)",
    description="Authenticate with `Authorization: Bearer` or, from EventSource, with "
    "`?ticket=` from `POST /events/tickets`. Resume with the `Last-Event-ID` header, "
    "`?lastEventId=` (for EventSource polyfills) or `?after=`, the first one given wins; "
    "a resume point past the user's newest event ends the stream at once with "
    "`resume_point_ahead`. 503 (with `Retry-After`) while this server's listener is found "
    "not to receive changes; a ticket refused so is not spent.",
    # Either scheme: the bearer token, or the ticket alone (EventSource sends no header).
    openapi_extra={"security": [{STREAM_TICKET_SCHEME: []}]},
)
@get_only  # a HEAD would hold a stream slot (and spend its ticket) for a body that never ends
async def stream_events(
    request: Request,
    user_id: UserIdPath,
    settings: SettingsDep,
    hub: FeedDep,
    caller: CallerDep,
    ticket: Annotated[
        str | None, Query(max_length=64, description="From POST /events/tickets; single use")
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=BIGINT_MAX, description="Send the events after this seq"),
        PlainDigits,
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
    last_event_id_param: Annotated[
        str | None,
        Query(
            alias="lastEventId",
            max_length=32,
            description="As `Last-Event-ID`, for EventSource polyfills that put it in the URL "
            "when they reconnect (event-source-polyfill does); the header wins",
        ),
    ] = None,
) -> FeedResponse:
    database: Database = request.app.state.db
    # The request's own mistakes first: they must not spend a single-use ticket.
    if not _accepts_event_stream(request.headers.get("accept")):
        raise NotAcceptable("This endpoint answers with text/event-stream only.")
    start = _start_seq(
        after,
        ResumePoint(last_event_id, "header.last-event-id", "Last-Event-ID"),
        ResumePoint(last_event_id_param, "query.lastEventId", "lastEventId"),
    )
    principal, subscription = await _subscribe(request, hub, user_id, caller, ticket, start)
    shutdown = anyio.Event()

    async def close_on_shutdown() -> None:
        await shutdown.wait()
        subscription.close("server_shutdown")

    try:
        return FeedResponse(
            _events(hub, database, subscription, principal.expires_at, settings.jaeger_ui_url),
            hub=hub,
            subscription=subscription,
            # no-transform: a proxy that compresses (Next.js's server, Express's compression)
            # would otherwise gzip the stream, and hold its small events back.
            headers={"Cache-Control": "no-store, no-transform"},
            ping=settings.feed_heartbeat_seconds,
            ping_message_factory=lambda: ServerSentEvent(comment="heartbeat"),
            send_timeout=settings.feed_send_timeout_seconds,
            data_sender_callable=close_on_shutdown,
            shutdown_event=shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )
    except BaseException:
        hub.unsubscribe(subscription)
        raise
