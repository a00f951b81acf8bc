"""The `users` table, and creating a user row (or refreshing its email and name) when a
token's user is first seen."""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Column, Engine, String, text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Field, SQLModel

from service.database import retried_once
from service.limits import USER_ID_MAX
from service.sqltypes import UTCDateTime
from service.text import control_error, is_utf8

if TYPE_CHECKING:
    from service.auth import Principal

EMAIL_MAX = 320
NAME_MAX = 200


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(sa_column=Column(String(USER_ID_MAX), primary_key=True))
    email: str | None = Field(default=None, sa_column=Column(String(EMAIL_MAX), nullable=True))
    name: str | None = Field(default=None, sa_column=Column(String(NAME_MAX), nullable=True))
    # Kept exact by triggers on tasks (migration 0006): the list's X-Total-Count without
    # counting every row.
    task_count: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default=text("0"))
    )
    # The `iat` of the token whose claims are stored: an older token (another tab's, from
    # before a rename, valid until it expires) does not replace newer claims.
    claims_issued_at: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = Field(
        sa_column=Column(UTCDateTime, nullable=False, server_default=text("CURRENT_TIMESTAMP"))
    )


USERS = User.__table__  # type: ignore[attr-defined]


def storable(value: str | None, max_length: int) -> str | None:
    """The value if the column can hold it, as one line of text (`service.text`)."""
    if value is None or len(value) > max_length or control_error(value) or not is_utf8(value):
        return None
    return value


def _storable_claims(principal: Principal) -> tuple[str | None, str | None]:
    """Email and name as the users table can hold them: one that cannot is left out (no 500)."""
    return storable(principal.email, EMAIL_MAX), storable(principal.name, NAME_MAX)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class UserProvisioner:
    """Writes a user row only when this process sees new claims, not on every request.

    The upsert runs in its own short transaction, so a request that later rolls back cannot
    leave the cache believing in a row that was never committed. The cache keeps 16-byte
    digests of the id and of its stored email and name, not the strings: the same size an
    entry whatever the claims' lengths, so a full cache costs megabytes, not up to 90.
    """

    def __init__(self, engine: Engine, max_entries: int = 100_000) -> None:
        self._engine = engine
        self._seen: dict[bytes, bytes] = {}  # digest of the id: digest of its stored claims
        self._lock = threading.Lock()
        self._max_entries = max_entries

    @staticmethod
    def _digests(principal: Principal) -> tuple[bytes, bytes, tuple[str | None, str | None]]:
        claims = _storable_claims(principal)
        # repr: unambiguous (None is not "", a quote is escaped); surrogatepass: any string.
        user = repr(principal.user_id).encode("utf-8", "surrogatepass")
        stored = repr(claims).encode("utf-8", "surrogatepass")
        return _digest(user), _digest(stored), claims

    def is_known(self, principal: Principal) -> bool:
        """True when this process already stored these claims: `ensure` would do nothing."""
        user, stored, _ = self._digests(principal)
        return self._seen.get(user) == stored

    def ensure(self, principal: Principal) -> None:
        user, stored, (email, name) = self._digests(principal)
        if self._seen.get(user) == stored:
            return
        values = {
            "id": principal.user_id,
            "email": email,
            "name": name,
            "claims_issued_at": principal.issued_at,
        }
        stmt = insert(USERS).values(values)
        stored_at, issued_at = USERS.c.claims_issued_at, stmt.excluded.claims_issued_at
        stmt = stmt.on_conflict_do_update(
            index_elements=[USERS.c.id],
            set_={
                "email": stmt.excluded.email,
                "name": stmt.excluded.name,
                "claims_issued_at": issued_at,
            },
            # Without an `iat` on either side the order is unknown: the latest request wins.
            where=stored_at.is_(None) | issued_at.is_(None) | (stored_at <= issued_at),
        )

        def upsert() -> None:
            with self._engine.begin() as conn:
                conn.execute(stmt)

        retried_once(upsert)
        with self._lock:
            if len(self._seen) >= self._max_entries:
                self._seen.clear()
            self._seen[user] = stored
