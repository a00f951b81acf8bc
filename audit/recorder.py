"""Appending an event to a user's chain inside the caller's transaction, in one statement
(`audit.append`), with or without the change it records.

The recorder never commits; the caller's unit of work commits the change and its event
together, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import Select, bindparam
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from audit.append import build_append
from audit.chain import GENESIS_HASH
from audit.models import HEADS, USER_AGENT_MAX
from audit.schemas import AuditAction
from observability import metrics
from service.database import on_commit

metrics.audit_actions_are(AuditAction)


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


# A chain's first event: its head, made in the caller's transaction (a concurrent first
# writer's head is waited for, then kept).
_MAKE_HEAD = (
    pg_insert(HEADS)
    .values(user_id=bindparam("user_id"), seq=0, hash=GENESIS_HASH)
    .on_conflict_do_nothing(index_elements=[HEADS.c.user_id])
)


@cache
def _plain_append() -> Select[Any]:
    return build_append()


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
    """Append an event for a change already made in this transaction."""
    _, event = record_change(
        session,
        ctx,
        _plain_append(),
        {},
        user_id=user_id,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        before=before,
        after=after,
        diff_fields=diff_fields,
        caused_by_seq=caused_by_seq,
    )
    return event


def record_change(
    session: Session,
    ctx: AuditContext,
    statement: Select[Any],
    params: dict[str, Any],
    *,
    user_id: str,
    action: str,
    entity_type: str,
    entity_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    diff_fields: tuple[str, ...],
    caused_by_seq: int | None = None,
) -> tuple[Any, RecordedEvent]:
    """Make a change and append its event in one statement (from `build_append`, with the
    change's own `params`): the change's returned row and the event.

    For a new entity, `entity_id` and the `id` of `after` are placeholders: the statement
    takes both from the inserted row.
    """
    changes = diff(before, after, diff_fields)
    values = {
        "ev_user_id": user_id,
        "ev_actor_id": ctx.actor_id,
        "ev_action": action,
        "ev_entity_type": entity_type,
        "ev_entity_id": entity_id,
        "ev_before": before,
        "ev_after": after,
        "ev_changes": changes,
        "ev_request_id": ctx.request_id,
        "ev_trace_id": ctx.trace_id,
        "ev_span_id": ctx.span_id,
        "ev_client_ip": ctx.client_ip,
        "ev_user_agent": ctx.user_agent[:USER_AGENT_MAX] if ctx.user_agent else None,
        "ev_caused_by_seq": caused_by_seq,
        **params,
    }
    row = session.execute(statement, values).first()
    if row is None:
        # The user's first event (no head yet): nothing was written; make the head, run again.
        session.execute(_MAKE_HEAD, {"user_id": user_id})
        row = session.execute(statement, values).first()
        if row is None:
            raise LookupError(f"{entity_type} {entity_id} was not there to change")
    on_commit(session, lambda: metrics.audit_event_committed(action))
    event = RecordedEvent(
        id=int(row.event_id),
        seq=int(row.event_seq),
        hash=str(row.event_hash),
        action=action,
        changed_fields=tuple(changes),
    )
    return row, event
