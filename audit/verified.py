"""The last point up to which each user's chain was verified, so that the verify endpoint
checks only the events appended since (its cost no longer grows with the whole chain).

A full re-verification from seq 1 stays available: `todo-api audit verify` and the endpoint's
`?full=true`; it holds the chain to the stored point too (`audit.verify.stored_point`). The
stored point only moves forward, and only after a verification that passed.

A failed verification over the API is recorded (`failed_at`) and the point is kept: it is
evidence (a deleted tail is found only by it). While a failure is recorded, the incremental
check recomputes the whole chain, so it reports what `?full=true` found; a check that passes
from seq 1 clears it. A check writes only if the row is still as its snapshot saw it, so a
check that began before a failure was recorded cannot clear it or move the point past it.
"""

from __future__ import annotations

from sqlalchemy import Connection, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from audit.chain import GENESIS_HASH
from audit.models import VERIFIED
from audit.verify import ChainReport, StoredPoint, snapshot, stored_point, verify_chain
from service.sqltypes import utcnow


def verify_and_record(session: Session, user_id: str, *, full: bool) -> ChainReport:
    """Check the user's chain in a read-only snapshot (from the stored point, or from seq 1
    with `full`), then record what was found in the unit's next transaction.

    The same pooled connection for both: a second one, taken while holding the first, could
    wait for the pool forever with DB_POOL_SIZE=1, and starves other requests under load.
    """
    conn = snapshot(session)
    seen = stored_point(conn, user_id)
    report = verify_chain(conn, user_id, resume=not full)
    session.rollback()  # the snapshot wrote nothing
    record_outcome(session.connection(), user_id, seen, report)
    return report


def record_outcome(
    conn: Connection, user_id: str, seen: StoredPoint | None, report: ChainReport
) -> None:
    """Store what a check found (in the caller's transaction); `seen` is the stored point as
    the check's snapshot read it."""
    now = utcnow()
    if not report.ok:
        # Always lands; the point stays as it is.
        failed = insert(VERIFIED).values(
            user_id=user_id, seq=0, hash=GENESIS_HASH, verified_at=now, failed_at=now
        )
        conn.execute(
            failed.on_conflict_do_update(
                index_elements=[VERIFIED.c.user_id], set_={"failed_at": now}
            )
        )
        return
    seq, hash_ = report.head_seq, report.head_hash or GENESIS_HASH
    values = {"seq": seq, "hash": hash_, "verified_at": now, "failed_at": None}
    if seen is None:
        if seq > 0:
            stmt = insert(VERIFIED).values(user_id=user_id, **values)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[VERIFIED.c.user_id]))
        return
    if seen.failed_at is None and seq <= seen.seq:
        return  # nothing new
    conn.execute(
        update(VERIFIED)
        .where(
            VERIFIED.c.user_id == user_id,
            VERIFIED.c.verified_at == seen.verified_at,
            VERIFIED.c.failed_at.is_not_distinct_from(seen.failed_at),
            VERIFIED.c.seq <= seq,
        )
        .values(**values)
    )
