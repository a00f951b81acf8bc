"""Stream tickets: how a browser's `EventSource`, which cannot send headers, authenticates.

A client trades its bearer token (in the Authorization header, as on every route) for a random
ticket, and opens the stream with `?ticket=...`. The ticket is single-use and lives
FEED_TICKET_TTL_SECONDS, so the copy a URL leaves behind (a proxy's access log, the browser's
history) is worthless once the stream has opened. Only its SHA-256 is stored; the app's own
traces and logs never carry it (observability redacts the query parameter). Tickets live in
PostgreSQL, so one made on one instance opens a stream on any other.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, String, bindparam, delete, insert
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel

from service.auth import EXPIRY_MAX, Principal
from service.database import Database, retried_once
from service.exceptions import AuthError, Forbidden, TokenExpired
from service.limits import USER_ID_MAX
from service.sqltypes import UTCDateTime, utcnow

# 32 random bytes, base64url: 43 characters.
TICKET_LENGTH = 43


class FeedTicket(SQLModel, table=True):
    __tablename__ = "feed_tickets"

    ticket_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    # The bearer token's own expiry: a stream opened with the ticket ends then.
    token_expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


TICKETS = FeedTicket.__table__  # type: ignore[attr-defined]

_PURGE = delete(TICKETS).where(TICKETS.c.expires_at < bindparam("now"))
_INSERT = insert(TICKETS)
_REDEEM = (
    delete(TICKETS)
    .where(TICKETS.c.ticket_hash == bindparam("ticket_hash"))
    .returning(TICKETS.c.user_id, TICKETS.c.expires_at, TICKETS.c.token_expires_at)
)


@dataclass(frozen=True, slots=True)
class IssuedTicket:
    ticket: str
    expires_at: datetime


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("ascii")).hexdigest()


def check_unexpired(principal: Principal) -> None:
    """A token past its `exp` (admitted within JWT_LEEWAY_SECONDS) cannot open a stream, which
    would end at once, nor get a ticket, already expired: a 401 makes the client refresh it."""
    if principal.expires_at <= utcnow().timestamp():
        raise TokenExpired("token expired; a stream needs a token that has not")


def issue(session: Session, principal: Principal, ttl_seconds: int) -> IssuedTicket:
    """A new ticket for this token's user, valid for `ttl_seconds` but never past the token."""
    check_unexpired(principal)
    now = utcnow()
    # A token may expire past year 9999, where datetime ends: for a ticket, that is never.
    token_expires_at = datetime.fromtimestamp(min(principal.expires_at, EXPIRY_MAX), UTC)
    expires_at = min(now + timedelta(seconds=ttl_seconds), token_expires_at)
    ticket = secrets.token_urlsafe(32)
    # Expired tickets are dropped here, so the table holds only the last few seconds' worth.
    session.execute(_PURGE, {"now": now})
    session.execute(
        _INSERT,
        {
            "ticket_hash": _digest(ticket),
            "user_id": principal.user_id,
            "expires_at": expires_at,
            "token_expires_at": token_expires_at,
        },
    )
    return IssuedTicket(ticket=ticket, expires_at=expires_at)


@dataclass(frozen=True, slots=True)
class RedeemedTicket:
    principal: Principal
    ticket: str
    expires_at: datetime


def redeem(database: Database, ticket: str, user_id: str) -> RedeemedTicket:
    """The principal a ticket stands for. The ticket is spent (committed) before it is judged,
    so a refused ticket cannot be tried again either. Blocking: call it in a thread."""
    invalid = AuthError("invalid or already used stream ticket")
    if len(ticket) != TICKET_LENGTH or not ticket.isascii():
        raise invalid

    def spend() -> Any:
        with database.unit_of_work() as session:
            return session.execute(_REDEEM, {"ticket_hash": _digest(ticket)}).first()

    row = retried_once(spend)
    if row is None:
        raise invalid
    owner, expires_at, token_expires_at = row
    if expires_at <= utcnow():
        raise TokenExpired("stream ticket expired")
    if owner != user_id:
        raise Forbidden("The stream ticket does not belong to this user.")
    principal = Principal(
        user_id=owner, email=None, name=None, expires_at=int(token_expires_at.timestamp())
    )
    return RedeemedTicket(principal, ticket, expires_at)


def give_back(database: Database, redeemed: RedeemedTicket) -> None:
    """Store a redeemed ticket again, as it was: the stream it was to open was refused for
    the server's sake (too many streams), not the client's. Blocking: call it in a thread."""
    principal = redeemed.principal
    values = {
        "ticket_hash": _digest(redeemed.ticket),
        "user_id": principal.user_id,
        "expires_at": redeemed.expires_at,
        "token_expires_at": datetime.fromtimestamp(principal.expires_at, UTC),
    }

    def store() -> None:
        with database.unit_of_work() as session:
            session.execute(_INSERT, values)

    retried_once(store)
