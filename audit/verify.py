"""Recomputing hash chains from the stored events.

A chain is read in seq order, in batches (never all at once), inside one read-only snapshot so
that appends committed meanwhile cannot look like a gap. Each event must have the next seq,
link to the previous event's hash (the genesis hash for seq 1) and hash to its stored value;
the last event must match the chain head row, so deleting the newest events is detected too.
The chain must also still hold the point the verify endpoint last found intact
(`audit_verified_heads`), in every mode: a deleted verified tail, with the head moved back to
match, links up on its own and is found only by that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, exists, select
from sqlalchemy.orm import Session

from audit.chain import GENESIS_HASH, HASHED_FIELDS, compute_hash
from audit.models import EVENTS, HEADS, VERIFIED

BATCH_SIZE = 1000
VERIFIED_SOURCE = "an earlier verification"
# Everything a hash covers (in any version), the stored hash and its version.
_COLUMNS = tuple(column for column in EVENTS.c if column.name not in {"id", "xact_id"})


@dataclass(frozen=True, slots=True)
class Anchor:
    """A chain head written down earlier (by an export or a checkpoint): the event at `seq`
    must still hash to `hash`. `source` names where it was written down, for the report."""

    seq: int
    hash: str
    source: str = "an export"


@dataclass(frozen=True, slots=True)
class ChainReport:
    user_id: str
    ok: bool
    events: int
    head_seq: int
    head_hash: str | None
    first_bad_seq: int | None = None
    reason: str | None = None
    # 0: checked from seq 1; else the last verified seq this check continued from.
    verified_from_seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ChainBroken(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def snapshot(session: Session) -> Connection:
    """The session's connection in a read-only REPEATABLE READ transaction.

    Must be called before the session has run anything, so that the whole verification sees
    one consistent state of the events and the chain heads.
    """
    return session.connection(
        execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    )


def _events(
    conn: Connection, user_id: str, batch_size: int, after: int | None = None
) -> Iterator[RowMapping]:
    """The chain in seq order (after `after`, if given), one batch in memory at a time (keyset
    on the (user_id, seq) index). Without `after` the first batch has no lower bound, so a seq
    below 1 is seen too."""
    last = after
    while True:
        stmt = select(*_COLUMNS).where(EVENTS.c.user_id == user_id)
        if last is not None:
            stmt = stmt.where(EVENTS.c.seq > last)
        rows = conn.execute(stmt.order_by(EVENTS.c.seq).limit(batch_size)).mappings().all()
        yield from rows
        if len(rows) < batch_size:
            return
        last = int(rows[-1]["seq"])


def _check_event(row: Mapping[Any, Any], expected_seq: int, prev_hash: str) -> None:
    seq = int(row["seq"])
    if seq > expected_seq:
        raise _ChainBroken(expected_seq, f"seq {expected_seq} is missing (found seq {seq} next)")
    if seq < expected_seq:
        raise _ChainBroken(seq, f"unexpected seq {seq} where seq {expected_seq} was due")
    if row["prev_hash"] != prev_hash:
        link = "the genesis hash" if seq == 1 else f"the hash of seq {seq - 1}"
        raise _ChainBroken(seq, f"seq {seq}: prev_hash does not match {link}")
    version = row["hash_version"]
    if version not in HASHED_FIELDS:
        raise _ChainBroken(seq, f"seq {seq}: unknown hash_version {version}")
    try:
        recomputed = compute_hash(row, version)
    except (TypeError, ValueError) as exc:
        raise _ChainBroken(seq, f"seq {seq}: cannot be encoded for hashing ({exc})") from None
    if recomputed != row["hash"]:
        raise _ChainBroken(seq, f"seq {seq}: hash mismatch, the event was altered")


def _check_end(
    last_seq: int, last_hash: str, head: Any | None, events: int, anchors: Sequence[Anchor]
) -> None:
    if head is None:
        if events:
            raise _ChainBroken(None, "the chain head record is missing")
    elif head.seq > last_seq:
        missing = (
            f"seq {head.seq} is"
            if head.seq == last_seq + 1
            else f"seqs {last_seq + 1} to {head.seq} are"
        )
        raise _ChainBroken(last_seq + 1, f"{missing} missing (the chain head is at seq {head.seq})")
    elif head.seq < last_seq:
        raise _ChainBroken(
            head.seq + 1, f"the chain head is at seq {head.seq} but events go up to {last_seq}"
        )
    elif head.hash != last_hash:
        raise _ChainBroken(last_seq, "the chain head's hash differs from the last event's hash")
    beyond = [anchor for anchor in anchors if anchor.seq > last_seq]
    if beyond:
        anchor = max(beyond, key=lambda a: a.seq)
        raise _ChainBroken(
            last_seq + 1,
            f"the chain ends at seq {last_seq} but {anchor.source} recorded its head at "
            f"seq {anchor.seq}",
        )


def _check_anchors(row: Mapping[Any, Any], due: list[Anchor], matched: int) -> int:
    """Check the anchors at this event's seq; return the highest seq known to match."""
    seq = int(row["seq"])
    for anchor in due:
        if anchor.hash != row["hash"]:
            changed = f"seq {seq}" if matched + 1 == seq else f"seqs {matched + 1} to {seq}"
            raise _ChainBroken(
                seq,
                f"seq {seq}: hash differs from the one {anchor.source} recorded; the chain "
                f"links up on its own, so the events were rewritten and re-hashed "
                f"(the change is in {changed})",
            )
    return seq


def _check_verified_point(conn: Connection, user_id: str, since: Anchor) -> None:
    """The last verified event must still be there, unaltered: it is where the check resumes."""
    row: Mapping[Any, Any] | None = (
        conn.execute(
            select(*_COLUMNS).where(EVENTS.c.user_id == user_id, EVENTS.c.seq == since.seq)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise _ChainBroken(since.seq, f"seq {since.seq}, the last verified event, is missing")
    version = row["hash_version"]
    try:
        intact = (
            row["hash"] == since.hash
            and version in HASHED_FIELDS
            and compute_hash(row, version) == since.hash
        )
    except (TypeError, ValueError):  # a value no hash covered (as in `_check_event`)
        intact = False
    if not intact:
        raise _ChainBroken(since.seq, f"seq {since.seq}: altered since it was last verified")


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A user's row of `audit_verified_heads`, as one snapshot saw it."""

    seq: int  # 0: no event verified yet
    hash: str
    verified_at: datetime
    failed_at: datetime | None  # a check failed after the last one that passed

    @property
    def anchor(self) -> Anchor | None:
        return Anchor(self.seq, self.hash, VERIFIED_SOURCE) if self.seq > 0 else None


def stored_point(conn: Connection, user_id: str) -> StoredPoint | None:
    """Where the verify endpoint last found the chain intact, and whether a check failed since."""
    row = conn.execute(
        select(VERIFIED.c.seq, VERIFIED.c.hash, VERIFIED.c.verified_at, VERIFIED.c.failed_at).where(
            VERIFIED.c.user_id == user_id
        )
    ).first()
    if row is None:
        return None
    return StoredPoint(int(row.seq), str(row.hash), row.verified_at, row.failed_at)


def verify_chain(
    conn: Connection,
    user_id: str,
    *,
    batch_size: int = BATCH_SIZE,
    anchors: Sequence[Anchor] = (),
    resume: bool = False,
) -> ChainReport:
    """Recompute one user's chain; the report names the first bad seq, if any.

    Each anchor's seq must still have its hash, and so must the stored verified point's. A
    rewrite between two anchors can be placed only that precisely: the reason names the range
    since the last anchor that matched. With `resume`, only the events after the stored point
    are checked, linked to it; the events before it are not recomputed. Not after a recorded
    failure: a failure in events verified earlier would not be seen again, so the whole chain
    is checked until a check passes.
    """
    head = conn.execute(select(HEADS.c.seq, HEADS.c.hash).where(HEADS.c.user_id == user_id)).first()
    head_seq = int(head.seq) if head is not None else 0
    head_hash = str(head.hash) if head is not None else None
    expected_seq, prev_hash, events, matched = 1, GENESIS_HASH, 0, 0
    stored = stored_point(conn, user_id)
    point = stored.anchor if stored is not None else None
    since = point if resume and stored is not None and stored.failed_at is None else None
    if point is not None and since is None:
        anchors = [*anchors, point]
    by_seq: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        by_seq.setdefault(anchor.seq, []).append(anchor)
    after: int | None = None
    from_seq = since.seq if since is not None else 0
    try:
        if since is not None:
            _check_verified_point(conn, user_id, since)
            expected_seq, prev_hash, after = since.seq + 1, since.hash, since.seq
        for row in _events(conn, user_id, batch_size, after):
            _check_event(row, expected_seq, prev_hash)
            due = by_seq.get(expected_seq)
            if due:
                matched = _check_anchors(row, due, matched)
            prev_hash = str(row["hash"])
            expected_seq += 1
            events += 1
        _check_end(expected_seq - 1, prev_hash, head, events + from_seq, anchors)
    except _ChainBroken as broken:
        return ChainReport(
            user_id,
            ok=False,
            events=events,
            head_seq=head_seq,
            head_hash=head_hash,
            first_bad_seq=broken.seq,
            reason=broken.reason,
            verified_from_seq=from_seq,
        )
    return ChainReport(
        user_id,
        ok=True,
        events=events,
        head_seq=head_seq,
        head_hash=head_hash,
        verified_from_seq=from_seq,
    )


def chain_user_ids(conn: Connection, batch_size: int = BATCH_SIZE) -> Iterator[str]:
    """Every user with a chain: those with a head row (paged by primary key), then any whose
    events have no head row, or who have a verified point but neither (only possible by
    tampering)."""
    last: str | None = None
    while True:
        stmt = select(HEADS.c.user_id)
        if last is not None:
            stmt = stmt.where(HEADS.c.user_id > last)
        ids = conn.execute(stmt.order_by(HEADS.c.user_id).limit(batch_size)).scalars().all()
        yield from ids
        if len(ids) < batch_size:
            break
        last = ids[-1]
    headless = (
        select(EVENTS.c.user_id)
        .where(~exists().where(HEADS.c.user_id == EVENTS.c.user_id))
        .distinct()
        .order_by(EVENTS.c.user_id)
    )
    yield from conn.execute(headless).scalars()
    gone = (
        select(VERIFIED.c.user_id)
        .where(
            VERIFIED.c.seq > 0,
            ~exists().where(HEADS.c.user_id == VERIFIED.c.user_id),
            ~exists().where(EVENTS.c.user_id == VERIFIED.c.user_id),
        )
        .order_by(VERIFIED.c.user_id)
    )
    yield from conn.execute(gone).scalars()


def verify_all(
    conn: Connection,
    *,
    batch_size: int = BATCH_SIZE,
    anchors: Mapping[str, Sequence[Anchor]] | None = None,
) -> Iterator[ChainReport]:
    """Every chain, one report each; chains an export, a checkpoint or the verify endpoint
    knew of but which are gone fail too."""
    pending = dict(anchors or {})
    for user_id in chain_user_ids(conn, batch_size):
        found = pending.pop(user_id, ())
        yield verify_chain(conn, user_id, batch_size=batch_size, anchors=found)
    for user_id, found in sorted(pending.items()):
        yield verify_chain(conn, user_id, batch_size=batch_size, anchors=found)
