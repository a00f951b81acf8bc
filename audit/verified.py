"""The last point up to which each user's chain was verified, so that the verify endpoint
checks only the events appended since (its cost no longer grows with the whole chain).

A full re-verification from seq 1 stays available: `todo-api audit verify` and the endpoint's
`?full=true`; it holds the chain to the stored point too (`audit.verify.stored_point`). The
stored point only moves forward, and only after a verification that passed.
"""

from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert

from audit.models import VERIFIED
from service.sqltypes import utcnow


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
