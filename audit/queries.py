"""Reading a user's audit trail: the feed, one task's history, and a task as it was.

Every query filters by the caller's user id, so another user's events are never visible. Pages
are keyset on `seq`, which the unique index (user_id, seq) serves: appends to a chain are
serialized and committed in seq order, so paging newest-first by `seq < cursor` neither repeats
nor skips an event while new ones arrive (they have higher seqs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, Select, exists, select
from sqlalchemy.orm import Session

from audit.chain import format_timestamp
from audit.models import EVENTS, HEADS
from audit.schemas import AuditAction
from service import paging
from service.exceptions import InvalidInput, NotFound
from service.limits import BIGINT_MAX

ENTITY_TASK = "task"
# Every column but xact_id, a PostgreSQL transaction number with no meaning outside it.
PUBLIC_COLUMNS = tuple(column for column in EVENTS.c if column.name != "xact_id")

CURSOR_MAX = 64
FEED_CURSOR = "f"
HISTORY_CURSOR = "h"
_CURSOR_TEXT = re.compile(r"([a-z])\.([0-9]{1,19})")


@dataclass(frozen=True, slots=True)
class EventPage:
    items: Sequence[RowMapping]
    next_cursor: str | None


def encode_cursor(kind: str, seq: int) -> str:
    """Opaque to clients: the page kind and the last seq returned, base64url."""
    return paging.wrap(f"{kind}.{seq}")


def decode_cursor(kind: str, cursor: str) -> int:
    """The seq a cursor continues from; anything not made by `encode_cursor(kind, ...)` is 400."""
    invalid = InvalidInput(
        "The cursor is not valid; use a next_cursor value from this endpoint.", field="query.cursor"
    )
    try:
        text = paging.unwrap(cursor, CURSOR_MAX).decode("ascii")
    except ValueError:
        raise invalid from None
    match = _CURSOR_TEXT.fullmatch(text)
    if match is None or match.group(1) != kind:
        raise invalid
    seq = int(match.group(2))
    if not 1 <= seq <= BIGINT_MAX or encode_cursor(kind, seq) != cursor:  # only what we wrote
        raise invalid
    return seq


def _page(session: Session, stmt: Select[Any], kind: str, limit: int) -> EventPage:
    """Run a query ordered by seq with one extra row, to know whether another page follows."""
    rows = session.execute(stmt.limit(limit + 1)).mappings().all()
    if len(rows) <= limit:
        return EventPage(items=rows, next_cursor=None)
    items = rows[:limit]
    return EventPage(items=items, next_cursor=encode_cursor(kind, int(items[-1]["seq"])))


def _is_task(task_id: int) -> Any:
    return (EVENTS.c.entity_type == ENTITY_TASK) & (EVENTS.c.entity_id == str(task_id))


def _of_task(user_id: str, task_id: int) -> Any:
    """One task's events: the (user_id, entity_type, entity_id, seq) index serves it."""
    return (EVENTS.c.user_id == user_id) & _is_task(task_id)


def list_events(
    session: Session,
    user_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    task_id: int | None = None,
    action: AuditAction | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    request_id: str | None = None,
    trace_id: str | None = None,
) -> EventPage:
    """The user's events, newest first; `since` is inclusive and `until` exclusive."""
    if since is not None and until is not None and since >= until:
        raise InvalidInput("`since` must be earlier than `until`.", field="query.since")
    stmt = select(*PUBLIC_COLUMNS).where(EVENTS.c.user_id == user_id)
    if cursor is not None:
        stmt = stmt.where(EVENTS.c.seq < decode_cursor(FEED_CURSOR, cursor))
    if task_id is not None:
        stmt = stmt.where(_is_task(task_id))
    if action is not None:
        stmt = stmt.where(EVENTS.c.action == action.value)
    if since is not None:
        stmt = stmt.where(EVENTS.c.occurred_at >= since)
    if until is not None:
        stmt = stmt.where(EVENTS.c.occurred_at < until)
    if request_id is not None:
        stmt = stmt.where(EVENTS.c.request_id == request_id)
    if trace_id is not None:
        stmt = stmt.where(EVENTS.c.trace_id == trace_id)
    return _page(session, stmt.order_by(EVENTS.c.seq.desc()), FEED_CURSOR, limit)


def events_after(session: Session, user_id: str, after: int, limit: int) -> Sequence[RowMapping]:
    """The user's events with seq > `after`, oldest first: what a change feed has not sent.

    Appends to a chain commit in seq order (the chain head's row lock is held to the commit),
    so whatever this returns has no holes, and reading on from its last seq neither repeats
    nor skips an event.
    """
    stmt = (
        select(*PUBLIC_COLUMNS)
        .where(EVENTS.c.user_id == user_id, EVENTS.c.seq > after)
        .order_by(EVENTS.c.seq.asc())
        .limit(limit)
    )
    return session.execute(stmt).mappings().all()


def chain_head_seq(session: Session, user_id: str) -> int:
    """The seq of the user's newest event (0 before the first): no event has a higher one, so a
    change feed asked to resume past it would wait for events the client already thinks it has."""
    seq = session.execute(select(HEADS.c.seq).where(HEADS.c.user_id == user_id)).scalar()
    return int(seq or 0)


def _task_ever_existed(session: Session, user_id: str, task_id: int) -> bool:
    """Every task write records an event, so a task that had none never existed."""
    return bool(session.execute(select(exists().where(_of_task(user_id, task_id)))).scalar())


def task_history(
    session: Session, user_id: str, task_id: int, *, limit: int, cursor: str | None = None
) -> EventPage:
    """Every event of one task, oldest first; 404 only if the user never had this task."""
    stmt = select(*PUBLIC_COLUMNS).where(_of_task(user_id, task_id))
    if cursor is not None:
        stmt = stmt.where(EVENTS.c.seq > decode_cursor(HISTORY_CURSOR, cursor))
    page = _page(session, stmt.order_by(EVENTS.c.seq.asc()), HISTORY_CURSOR, limit)
    if not page.items and (cursor is None or not _task_ever_existed(session, user_id, task_id)):
        raise NotFound(f"Task {task_id} not found.")
    return page


def task_as_of(session: Session, user_id: str, task_id: int, as_of: datetime) -> RowMapping:
    """The task's last event at or before `as_of`; its `after` is the whole task at that time.

    404 when the task had not been created yet, had been deleted, or never existed.
    """
    row = (
        session.execute(
            select(*PUBLIC_COLUMNS)
            .where(_of_task(user_id, task_id), EVENTS.c.occurred_at <= as_of)
            .order_by(EVENTS.c.seq.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    if row is None:
        if _task_ever_existed(session, user_id, task_id):
            raise NotFound(f"Task {task_id} did not exist yet at {format_timestamp(as_of)}.")
        raise NotFound(f"Task {task_id} not found.")
    if row["action"] == AuditAction.deleted or row["after"] is None:
        raise NotFound(f"Task {task_id} had been deleted by {format_timestamp(as_of)}.")
    return row
