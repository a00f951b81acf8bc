"""Appending an event to a user's chain, inside the caller's transaction.

The recorder only flushes; the caller's unit of work commits the change and its event
together, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from audit.chain import GENESIS_HASH, HASH_VERSION, compute_hash
from audit.models import AuditChainHead, AuditEvent
from service.sqltypes import UTCDateTime

EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]
HEADS = AuditChainHead.__table__  # type: ignore[attr-defined]
USER_AGENT_MAX = 256


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who made the request and how to find it again (request id, trace)."""

    actor_id: str
    request_id: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    trace_id: str | None = None
    span_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    id: int
    seq: int
    hash: str
    action: str
    changed_fields: tuple[str, ...]


def diff(
    before: dict[str, Any] | None, after: dict[str, Any] | None, fields: tuple[str, ...]
) -> dict[str, list[Any]]:
    """`{field: [old, new]}` for the fields that differ."""
    changes: dict[str, list[Any]] = {}
    for name in fields:
        old = before.get(name) if before else None
        new = after.get(name) if after else None
        if old != new or (before is None) != (after is None):
            changes[name] = [old, new]
    return changes


def _advance_head(session: Session, user_id: str) -> tuple[int, str, datetime]:
    """Lock the user's chain head and take the next seq, the previous hash and the DB time.

    The upsert's row lock serializes appends to one chain across processes; other users'
    chains are other rows and never wait.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # Evaluated after the lock is granted, so time order follows seq order.
        clock = func.clock_timestamp(type_=UTCDateTime)
        insert_head = pg_insert
    else:
        clock = func.strftime("%Y-%m-%d %H:%M:%f", "now", type_=UTCDateTime)
        insert_head = sqlite_insert  # type: ignore[assignment]
    stmt = insert_head(HEADS).values(user_id=user_id, seq=1, hash=GENESIS_HASH)
    stmt = stmt.on_conflict_do_update(
        index_elements=[HEADS.c.user_id], set_={"seq": HEADS.c.seq + 1}
    )
    # On conflict the returned hash is the unchanged one: the previous event's.
    row = session.execute(stmt.returning(HEADS.c.seq, HEADS.c.hash, clock)).one()
    return int(row[0]), str(row[1]), row[2]


def record_event(
    session: Session,
    ctx: AuditContext,
    *,
    user_id: str,
    action: str,
    entity_type: str,
    entity_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    diff_fields: tuple[str, ...],
) -> RecordedEvent:
    changes = diff(before, after, diff_fields)
    seq, prev_hash, occurred_at = _advance_head(session, user_id)
    event: dict[str, Any] = {
        "user_id": user_id,
        "seq": seq,
        "prev_hash": prev_hash,
        "occurred_at": occurred_at,
        "actor_id": ctx.actor_id,
        "action": action,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "before": before,
        "after": after,
        "changes": changes,
        "request_id": ctx.request_id,
        "trace_id": ctx.trace_id,
        "span_id": ctx.span_id,
        "client_ip": ctx.client_ip,
        "user_agent": ctx.user_agent[:USER_AGENT_MAX] if ctx.user_agent else None,
    }
    event["hash"] = compute_hash(event)
    values = dict(event, hash_version=HASH_VERSION)
    insert_event = insert(EVENTS).values(values).returning(EVENTS.c.id)
    move_head = update(HEADS).where(HEADS.c.user_id == user_id).values(hash=event["hash"])
    if session.get_bind().dialect.name == "postgresql":
        values["xact_id"] = func.txid_current()
        # One round trip: the event and the new head hash in a single statement.
        inserted = insert(EVENTS).values(values).returning(EVENTS.c.id).cte("inserted")
        event_id = session.execute(
            move_head.add_cte(inserted).returning(select(inserted.c.id).scalar_subquery())
        ).scalar_one()
    else:
        event_id = session.execute(insert_event).scalar_one()
        session.execute(move_head)
    return RecordedEvent(
        id=int(event_id),
        seq=seq,
        hash=event["hash"],
        action=action,
        changed_fields=tuple(changes),
    )
