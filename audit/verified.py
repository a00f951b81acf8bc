"""The last point up to which each user's chain was verified, so that the verify endpoint
checks only the events appended since (its cost no longer grows with the whole chain).

A full re-verification from seq 1 stays available: `todo-api audit verify` and the endpoint's
`?full=true`. The stored point only moves forward, and only after a verification that passed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Connection, String, select
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Field, SQLModel

from audit.verify import Anchor
from service.sqltypes import UTCDateTime, utcnow


class AuditVerifiedHead(SQLModel, table=True):
    __tablename__ = "audit_verified_heads"

    user_id: str = Field(sa_column=Column(String(128), primary_key=True))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    verified_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


VERIFIED = AuditVerifiedHead.__table__  # type: ignore[attr-defined]


def last_verified(conn: Connection, user_id: str) -> Anchor | None:
    row = conn.execute(
        select(VERIFIED.c.seq, VERIFIED.c.hash).where(VERIFIED.c.user_id == user_id)
    ).first()
    return Anchor(seq=int(row.seq), hash=str(row.hash)) if row is not None else None


def remember_verified(conn: Connection, user_id: str, seq: int, hash_: str) -> None:
    """Store the new verified point (in the caller's transaction); never move it backwards."""
    if seq <= 0:
        return
    stmt = insert(VERIFIED).values(user_id=user_id, seq=seq, hash=hash_, verified_at=utcnow())
    stmt = stmt.on_conflict_do_update(
        index_elements=[VERIFIED.c.user_id],
        set_={"seq": stmt.excluded.seq, "hash": stmt.excluded.hash, "verified_at": utcnow()},
        where=VERIFIED.c.seq < stmt.excluded.seq,
    )
    conn.execute(stmt)
