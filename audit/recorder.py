"""Appending an event to a user's chain, inside the caller's transaction.

The recorder only flushes; the caller's unit of work commits the change and its event
together, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import BigInteger, String, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from audit.chain import GENESIS_HASH, HASH_VERSION, HASHED_FIELDS, compute_hash
from audit.models import EVENTS, HEADS, USER_AGENT_MAX
from observability import metrics
from service.database import on_commit
from service.sqltypes import UTCDateTime


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


# Every column the recorder writes (what is hashed, the hash and its version), as bound
# parameters of statements built once.
EVENT_COLUMNS = (*HASHED_FIELDS[HASH_VERSION], "hash", "hash_version")


# clock_timestamp() is evaluated after the lock is granted: time order follows seq order.
_ADVANCE_HEAD_SQL = (
    "INSERT INTO audit_chain_heads (user_id, seq, hash) VALUES (:head_user, 1, :genesis) "
    "ON CONFLICT (user_id) DO UPDATE SET seq = audit_chain_heads.seq + 1 "
    "RETURNING seq, hash, clock_timestamp() AS occurred_at"
)


@dataclass(frozen=True, slots=True)
class _Statements:
    advance_head: Any
    append: Any


@cache
def _statements() -> _Statements:
    """The recorder's statements, built once: SQLAlchemy reuses their compiled form."""
    values: dict[str, Any] = {
        name: bindparam(f"ev_{name}", type_=EVENTS.c[name].type) for name in EVENT_COLUMNS
    }
    # The head upsert locks the user's chain head (appends to one chain queue here, other
    # users' chains are other rows) and takes the next seq, the previous hash (on conflict
    # the returned hash is the unchanged one) and the database's time. Plain SQL: SQLAlchemy
    # cannot cache the compiled form of an ON CONFLICT construct.
    advance = (
        text(_ADVANCE_HEAD_SQL)
        .bindparams(genesis=GENESIS_HASH)
        .columns(seq=BigInteger(), hash=String(), occurred_at=UTCDateTime())
    )
    move_head = (
        update(HEADS)
        .where(HEADS.c.user_id == bindparam("head_user"))
        .values(hash=bindparam("head_hash"))
    )
    # One round trip: the event and the new head hash in a single statement.
    values["xact_id"] = func.txid_current()
    inserted = insert(EVENTS).values(values).returning(EVENTS.c.id).cte("inserted")
    with_head = move_head.add_cte(inserted).returning(select(inserted.c.id).scalar_subquery())
    return _Statements(advance_head=advance, append=with_head)


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
    caused_by_seq: int | None = None,
) -> RecordedEvent:
    changes = diff(before, after, diff_fields)
    statements = _statements()
    head = session.execute(statements.advance_head, {"head_user": user_id}).one()
    seq, prev_hash, occurred_at = int(head[0]), str(head[1]), head[2]
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
        "caused_by_seq": caused_by_seq,
    }
    event["hash"] = compute_hash(event)
    params = {f"ev_{name}": value for name, value in event.items()}
    params.update(ev_hash_version=HASH_VERSION, head_user=user_id, head_hash=event["hash"])
    event_id = session.execute(statements.append, params).scalar_one()
    on_commit(session, lambda: metrics.audit_event_committed(action))
    return RecordedEvent(
        id=int(event_id),
        seq=seq,
        hash=event["hash"],
        action=action,
        changed_fields=tuple(changes),
    )
