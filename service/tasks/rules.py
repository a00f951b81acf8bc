"""The task rules: create, update, complete and delete, each with its audit event.

Each write changes the task and appends its audit event in the caller's session, under the
task's row lock, and never commits: the caller's unit of work commits both, or neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import trace
from sqlalchemy.orm import Session

from audit.recorder import AuditContext, RecordedEvent, record_event
from service.database import on_commit
from service.exceptions import PreconditionFailed
from service.sqltypes import utcnow
from service.tasks import queries
from service.tasks.models import TaskCreate, TaskRecord, TaskUpdate

log = logging.getLogger("service.tasks")

ENTITY_TYPE = "task"
# What a task's audit events diff: what a client can change (timestamps and version change on
# every write anyway, the id and owner never).
DIFF_FIELDS = tuple(TaskUpdate.model_fields)


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A create or update: the task as it is now, and its audit event if anything changed."""

    task: TaskRecord
    event: RecordedEvent | None


@dataclass(frozen=True, slots=True)
class TaskDeletion:
    """A delete: the task as it was, and its audit event."""

    task: TaskRecord
    event: RecordedEvent


def _log_on_commit(session: Session, user_id: str, task_id: int, event: RecordedEvent) -> None:
    """One INFO line per change, once it is durable, and the event on the request's span.

    Never the title or description text.
    """

    def emit() -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {"audit.event_id": event.id, "audit.action": event.action, "task.id": task_id}
            )
        log.info(
            event.action,
            extra={
                "event": event.action,
                "task_id": task_id,
                "user_id": user_id,
                "audit_event_id": event.id,
                "changed_fields": list(event.changed_fields),
            },
        )

    on_commit(session, emit)


def _record(
    session: Session,
    ctx: AuditContext,
    action: str,
    task_id: int,
    user_id: str,
    before: TaskRecord | None,
    after: TaskRecord | None,
) -> RecordedEvent:
    event = record_event(
        session,
        ctx,
        user_id=user_id,
        action=action,
        entity_type=ENTITY_TYPE,
        entity_id=str(task_id),
        before=before.state() if before else None,
        after=after.state() if after else None,
        diff_fields=DIFF_FIELDS,
    )
    _log_on_commit(session, user_id, task_id, event)
    return event


def _next_timestamp(previous: datetime) -> datetime:
    """Now, but strictly after `previous`, so updated_at advances on every change."""
    now = utcnow()
    return now if now > previous else previous + timedelta(microseconds=1)


def _check_version(task: TaskRecord, if_match: str | None) -> None:
    if if_match is None:
        return
    tags = {tag.strip() for tag in if_match.split(",")}
    if "*" not in tags and task.etag not in tags and f"W/{task.etag}" not in tags:
        raise PreconditionFailed("The task has changed since you read it (ETag mismatch).")


def create_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    data: TaskCreate,
) -> TaskChange:
    task = queries.insert_task(session, user_id, data.model_dump(), utcnow())
    event = _record(session, ctx, "task.created", task.id, user_id, None, task)
    return TaskChange(task=task, event=event)


def _completion_action(completed: bool) -> str:
    return "task.completed" if completed else "task.reopened"


def _apply(
    session: Session,
    ctx: AuditContext,
    current: TaskRecord,
    values: dict[str, Any],
) -> TaskChange:
    """Write the changed fields of a locked task and record the event; a no-op writes nothing.

    A change of the completion flag alone is `task.completed` / `task.reopened`, whichever
    endpoint made it; any other change is `task.updated`.
    """
    changed = {k: v for k, v in values.items() if getattr(current, k) != v}
    action = (
        _completion_action(changed["completed"])
        if changed.keys() == {"completed"}
        else "task.updated"
    )
    if not changed:
        return TaskChange(task=current, event=None)
    task = queries.update_fields(session, current.id, changed, _next_timestamp(current.updated_at))
    event = _record(session, ctx, action, task.id, task.user_id, current, task)
    return TaskChange(task=task, event=event)


def update_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    data: TaskUpdate,
    *,
    if_match: str | None = None,
) -> TaskChange:
    current = queries.lock_task(session, user_id, task_id)
    _check_version(current, if_match)
    return _apply(session, ctx, current, data.changes())


def set_completed(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    completed: bool | None,
    *,
    if_match: str | None = None,
) -> TaskChange:
    """Set the completion flag, or toggle it when `completed` is None (atomic under the lock)."""
    current = queries.lock_task(session, user_id, task_id)
    _check_version(current, if_match)
    target = (not current.completed) if completed is None else completed
    return _apply(session, ctx, current, {"completed": target})


def delete_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    *,
    if_match: str | None = None,
) -> TaskDeletion:
    current = queries.lock_task(session, user_id, task_id)
    _check_version(current, if_match)
    queries.delete_row(session, current.id)
    event = _record(session, ctx, "task.deleted", current.id, user_id, current, None)
    return TaskDeletion(task=current, event=event)
