"""The reminder statements, built once: the workers' claim, marking a reminder fired, and a
user's reminders. Every statement on a user's tasks names the owner; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session

from audit.models import HEADS
from service import paging
from service.tasks.models import REMINDER_UNFIRED, TASKS


class ReminderState(StrEnum):
    pending = "pending"
    fired = "fired"


@dataclass(frozen=True, slots=True)
class Claim:
    """A due reminder this transaction holds the task's row lock for."""

    task_id: int
    user_id: str
    late: bool


# The predicate of the partial index ix_tasks_reminder_due, as declared: the planner reads
# only due, unfired reminders through it.
_UNFIRED = text(f"({REMINDER_UNFIRED})")
# Oldest first; rows another worker holds are skipped, not waited for. Whoever holds a row
# holds it to its commit: a worker that dies rolls back, and the row is free again.
# The user's chain head is claimed with the task: a reminder whose user is in the middle of a
# write (or of another worker's batch) waits for the next poll, instead of the whole batch,
# every other user's reminders in it included, waiting at that user's append.
_CLAIM = (
    select(
        TASKS.c.id,
        TASKS.c.user_id,
        (func.now() - TASKS.c.remind_at > bindparam("grace")).label("late"),
    )
    .select_from(TASKS.join(HEADS, HEADS.c.user_id == TASKS.c.user_id))
    .where(TASKS.c.remind_at <= func.now(), _UNFIRED)
    .order_by(TASKS.c.remind_at, TASKS.c.id)
    .limit(bindparam("batch"))
    .with_for_update(of=[TASKS, HEADS], skip_locked=True)
)
# Not `updated_at` nor `version`: a reminder firing is not an edit of the task.
_MARK_FIRED = (
    update(TASKS)
    .where(TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner"))
    .values(
        reminder_fired_for=TASKS.c.remind_at,
        # When it fired, not when its batch began.
        reminder_fired_at=func.clock_timestamp(),
        reminder_late=bindparam("late"),
    )
)


def claim_due(session: Session, batch: int, grace: timedelta) -> list[Claim]:
    rows = session.execute(_CLAIM, {"batch": batch, "grace": grace})
    return [Claim(task_id=int(r.id), user_id=r.user_id, late=bool(r.late)) for r in rows]


def mark_fired(session: Session, claim: Claim) -> None:
    session.execute(
        _MARK_FIRED, {"task_id": claim.task_id, "owner": claim.user_id, "late": claim.late}
    )


@dataclass(frozen=True, slots=True)
class Reminder:
    task_id: int
    title: str
    remind_at: datetime
    due_at: datetime | None
    state: ReminderState
    fired_at: datetime | None
    late: bool


_FIRED = TASKS.c.reminder_fired_for == TASKS.c.remind_at
_STATES: dict[ReminderState | None, Any] = {
    ReminderState.pending: _UNFIRED,
    ReminderState.fired: _FIRED,
    # A reminder of a completed task that never fired is neither: it was cancelled.
    None: or_(_UNFIRED, _FIRED),
}


def _list_statement(state: ReminderState | None, after: bool) -> Any:
    # ix_tasks_user_remind (user_id, remind_at, id) WHERE remind_at IS NOT NULL serves it.
    later = tuple_(TASKS.c.remind_at, TASKS.c.id) > tuple_(
        bindparam("after_at", type_=TASKS.c.remind_at.type), bindparam("after_id")
    )
    return (
        select(
            TASKS.c.id,
            TASKS.c.title,
            TASKS.c.remind_at,
            TASKS.c.due_at,
            _FIRED.label("fired"),
            TASKS.c.reminder_fired_at,
            TASKS.c.reminder_late,
        )
        .where(
            TASKS.c.user_id == bindparam("owner"),
            TASKS.c.remind_at.is_not(None),
            _STATES[state],
            *([later] if after else []),
        )
        .order_by(TASKS.c.remind_at, TASKS.c.id)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


_LISTS = {
    (state, after): _list_statement(state, after) for state in _STATES for after in (False, True)
}


def encode_after(reminder: Reminder) -> str:
    return paging.encode("reminders", reminder.remind_at, reminder.task_id)


def decode_after(cursor: str) -> tuple[datetime, int]:
    try:
        remind_at, task_id = paging.decode(cursor, "reminders")
        return paging.aware_time(remind_at), paging.item_id(task_id)
    except (ValueError, TypeError):
        raise paging.invalid() from None


def list_reminders(
    session: Session,
    user_id: str,
    state: ReminderState | None,
    limit: int,
    offset: int,
    after: tuple[datetime, int] | None = None,
) -> list[Reminder]:
    """The user's reminders by time (after `after`: a remind_at and a task id); `limit` + 1
    rows tell the caller whether more follow."""
    params: dict[str, Any] = {"owner": user_id, "limit": limit, "offset": offset}
    if after is not None:
        params.update(after_at=after[0], after_id=after[1])
    rows = session.execute(_LISTS[state, after is not None], params)
    return [
        Reminder(
            task_id=int(r.id),
            title=r.title,
            remind_at=r.remind_at,
            due_at=r.due_at,
            state=ReminderState.fired if r.fired else ReminderState.pending,
            fired_at=r.reminder_fired_at if r.fired else None,
            late=bool(r.reminder_late) if r.fired else False,
        )
        for r in rows
    ]
