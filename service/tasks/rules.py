"""The task rules: create, update, complete and delete, and a tag's rename or delete (one
event per task it changes), each with its audit event.

Each write changes the task and appends its audit event in the caller's session, under the
task's row lock, and never commits: the caller's unit of work commits both, or neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import trace
from sqlalchemy.orm import Session

from audit.recorder import AuditContext, RecordedEvent, record_change, record_event
from service.conditional import ETags, matches
from service.database import on_commit
from service.exceptions import InvalidInput, PreconditionFailed
from service.sqltypes import utcnow
from service.tags import queries as tag_queries
from service.tags.rules import sorted_names
from service.tasks import idempotency, queries, recurrence
from service.tasks.models import TaskCreate, TaskRecord, TaskUpdate

log = logging.getLogger("service.tasks")

ENTITY_TYPE = "task"
# What a task's audit events diff: what a client can change, and the task's place in its
# recurring series (timestamps and version change on every write anyway, id and owner never).
SERIES_FIELDS = ("previous_task_id", "next_task_id")
DIFF_FIELDS = (*TaskUpdate.model_fields, *SERIES_FIELDS)


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


# Set in the session once its first event is on its way to the request's span.
_SPAN_EVENT = "todo_api.span_event"


def _log_on_commit(session: Session, user_id: str, task_id: int, event: RecordedEvent) -> None:
    """One INFO line per change, once it is durable, and the request's first event (the one
    the client asked for, not a recurring task's next occurrence) on the request's span.

    Never the title or description text.
    """
    first = not session.info.get(_SPAN_EVENT, False)
    session.info[_SPAN_EVENT] = True

    def emit() -> None:
        span = trace.get_current_span()
        if first and span.is_recording():
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
    """The event of a change already made in this transaction (a tag's rename or removal)."""
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


def _write(
    session: Session,
    ctx: AuditContext,
    action: str,
    change: queries.Audited,
    before: TaskRecord | None,
    after: TaskRecord | None,
    *,
    caused_by_seq: int | None = None,
) -> tuple[Any, RecordedEvent]:
    """Make the change and record its event, in one statement; the change's row and the event.

    A new task's `after` carries a placeholder id: the statement sets the real one.
    """
    task = after or before
    assert task is not None
    row, event = record_change(
        session,
        ctx,
        change.statement,
        change.params,
        user_id=task.user_id,
        action=action,
        entity_type=ENTITY_TYPE,
        entity_id=str(task.id),
        before=before.state() if before else None,
        after=after.state() if after else None,
        diff_fields=DIFF_FIELDS,
        caused_by_seq=caused_by_seq,
    )
    _log_on_commit(session, task.user_id, int(row.id), event)
    return row, event


def _next_timestamp(previous: datetime) -> datetime:
    """Now, but strictly after `previous`, so updated_at advances on every change."""
    now = utcnow()
    return now if now > previous else previous + timedelta(microseconds=1)


def _check_version(
    task: TaskRecord, if_match: ETags | None, if_none_match: ETags | None = None
) -> None:
    """RFC 9110 13.2.2, once the task is known to exist: If-Match, then If-None-Match (on a
    write, a listed current tag or `*` is 412: a client sending `*` asked not to overwrite)."""
    if if_match is not None and not matches(task.etag, if_match):
        raise PreconditionFailed("The task has changed since you read it (ETag mismatch).")
    if if_none_match is not None and matches(task.etag, if_none_match):
        raise PreconditionFailed("If-None-Match lists the task's current ETag (or `*`).")


def create_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    data: TaskCreate,
) -> TaskChange:
    _check_recurs(data.due_at, data.recurrence)
    task, event = _insert(session, ctx, user_id, data.model_dump())
    return TaskChange(task=task, event=event)


def create_task_once(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    data: TaskCreate,
    *,
    key: str | None,
    retention: timedelta,
) -> tuple[dict[str, Any], bool]:
    """The new task's public form, False; or, for an `Idempotency-Key` already used with the
    same body within `retention`, the first response's, True (replayed). The key is claimed
    and its response stored in the task's own transaction (`service.tasks.idempotency`)."""
    if key is not None:
        # Fields at their defaults are left out: a body of the first release (title and
        # description) keeps the fingerprint it had then.
        fields = data.model_dump(mode="json", exclude_defaults=True)
        fields.update(title=data.title, description=data.description)
        fingerprint = idempotency.request_fingerprint(fields)
        stored = idempotency.claim(session, user_id, key, fingerprint, retention)
        if stored is not None:
            return stored.body, True
    public = queries.public(create_task(session, ctx, user_id, data).task)
    if key is not None:
        idempotency.store_response(session, user_id, key, 201, public)
    return public, False


def _insert(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    values: dict[str, Any],
    *,
    task_id: int | None = None,
    previous_task_id: int | None = None,
    caused_by_seq: int | None = None,
    resolved: list[tuple[int, str]] | None = None,
) -> tuple[TaskRecord, RecordedEvent]:
    """Insert a task, link its tags (unknown names are created for the user) and record its
    `task.created`: the tags first (unless the caller `resolved` them), then one statement for
    the rest."""
    _check_rule(values.get("due_at"), values.get("recurrence"))
    _check_remind(values.get("due_at"), values.get("remind_at"))
    if resolved is None:
        resolved = tag_queries.resolve(session, user_id, list(values.get("tags") or ()))
    now = utcnow()
    draft = TaskRecord(
        **{name: values[name] for name in queries.INSERTED_FIELDS},
        id=task_id or 0,  # a new id is the database's
        user_id=user_id,
        completed=False,
        created_at=now,
        updated_at=now,
        tags=tuple(sorted_names([name for _, name in resolved])),
        previous_task_id=previous_task_id,
        next_task_id=None,
        version=1,
        reminder_fired_for=None,
        reminder_fired_at=None,
        reminder_late=False,
    )
    change = queries.create_statement(
        draft, [tag_id for tag_id, _ in resolved], explicit_id=task_id is not None
    )
    row, event = _write(
        session, ctx, "task.created", change, None, draft, caused_by_seq=caused_by_seq
    )
    return replace(queries.record_of(row), tags=draft.tags), event


def _check_rule(due_at: datetime | None, rule: str | None) -> None:
    if rule is not None and due_at is None:
        raise InvalidInput(
            "A recurring task needs a due_at: set due_at, or remove recurrence.",
            field="body.recurrence",
        )


def _check_recurs(due_at: datetime | None, rule: str | None) -> None:
    """A rule the client sets (or a due date it moves) must have a date after `due_at`.
    Not checked on the occurrences a series makes: its last one may have none left."""
    if rule is None or due_at is None:
        return
    try:
        recurrence.check_recurs(rule, due_at)
    except recurrence.RuleError as exc:
        raise InvalidInput(str(exc), field="body.recurrence") from None


def _check_remind(due_at: datetime | None, remind_at: datetime | None) -> None:
    """A reminder comes at the latest when the task is due."""
    if remind_at is not None and due_at is not None and remind_at > due_at:
        raise InvalidInput(
            "remind_at must not be after due_at: move remind_at earlier, or due_at later.",
            field="body.remind_at",
        )


def _completion_action(completed: bool) -> str:
    return "task.completed" if completed else "task.reopened"


def _apply(
    session: Session,
    ctx: AuditContext,
    current: TaskRecord,
    values: dict[str, Any],
    resolved: list[tuple[int, str]] | None = None,
) -> TaskChange:
    """Write the changed fields of a locked task and record the event; a no-op writes nothing.

    `resolved`: the new tags' ids and names (`values["tags"]`, resolved before the task was
    locked), or None when the tags are not being set.

    A change of the completion flag alone is `task.completed` / `task.reopened`, whichever
    endpoint made it; any other change is `task.updated`. Completing a recurring task that has
    not made its next occurrence yet makes it, in the same transaction (`_next_occurrence`).
    """
    changed = {k: v for k, v in values.items() if k != "tags" and getattr(current, k) != v}
    tags, tags_changed = current.tags, False
    if resolved is not None:
        names = tuple(sorted_names([name for _, name in resolved]))
        if names != current.tags:
            tags, tags_changed = names, True
            tag_queries.set_links(session, current.user_id, current.id, [i for i, _ in resolved])
    if not changed and not tags_changed:
        return TaskChange(task=current, event=None)
    action = (
        _completion_action(changed["completed"])
        if changed.keys() == {"completed"} and not tags_changed
        else "task.updated"
    )
    due_at = changed.get("due_at", current.due_at)
    rule = changed.get("recurrence", current.recurrence)
    _check_rule(due_at, rule)
    if changed.keys() & {"recurrence", "due_at"}:
        _check_recurs(due_at, rule)
    _check_remind(due_at, changed.get("remind_at", current.remind_at))
    if "remind_at" in changed:
        # A new time is a new reminder, armed whatever fired before: also the time that fired
        # last, set again after another (it is in the past: it fires at once, as any past time).
        changed.update(reminder_fired_for=None, reminder_fired_at=None, reminder_late=False)
    following: recurrence.Occurrence | None = None
    if changed.get("completed") is True and rule and due_at and current.next_task_id is None:
        following = recurrence.next_occurrence(rule, due_at)
        if following is not None:
            changed["next_task_id"] = queries.next_task_id(session)
    next_tags: list[tuple[int, str]] = []
    if following is not None and tags:
        # The next occurrence's tags, before the chain head. The user's tag lock, held shared
        # since the task was locked (`update_task`, `set_completed`), keeps them from being
        # renamed or deleted, so this waits for nothing while it holds the task.
        next_tags = (
            resolved
            if resolved is not None
            else tag_queries.resolve(session, current.user_id, list(tags))
        )
    now = _next_timestamp(current.updated_at)
    after = replace(current, **changed, tags=tags, updated_at=now, version=current.version + 1)
    statement = queries.update_statement(current.user_id, current.id, changed, now)
    row, event = _write(session, ctx, action, statement, current, after)
    task = queries.record_of(row)
    if task != after:  # what the event says is what was stored, or nothing is
        raise RuntimeError(f"task {task.id}: the recorded state differs from the stored one")
    if following is not None:
        _next_occurrence(session, ctx, task, following, event, next_tags)
    return TaskChange(task=task, event=event)


def _next_occurrence(
    session: Session,
    ctx: AuditContext,
    completed: TaskRecord,
    following: recurrence.Occurrence,
    cause: RecordedEvent,
    tags: list[tuple[int, str]],
) -> TaskRecord:
    """The series' next task: a copy of the completed one (its `tags` already resolved), due
    at the rule's next date, with the rest of the rule; its `task.created` names the
    completion as its cause. Every field a client gives at creation is copied (a new one
    too), but for these three."""
    values = {name: getattr(completed, name) for name in queries.INSERTED_FIELDS}
    values.update(
        tags=completed.tags,
        due_at=following.due_at,
        recurrence=following.rule,
        # The reminder keeps its distance from the due date.
        remind_at=None
        if completed.remind_at is None or completed.due_at is None
        else completed.remind_at + (following.due_at - completed.due_at),
    )
    task, _ = _insert(
        session,
        ctx,
        completed.user_id,
        values,
        task_id=completed.next_task_id,
        previous_task_id=completed.id,
        caused_by_seq=cause.seq,
        resolved=tags,
    )
    return task


def update_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    data: TaskUpdate,
    *,
    if_match: ETags | None = None,
    if_none_match: ETags | None = None,
) -> TaskChange:
    changes = data.changes()
    resolved = None
    if "tags" in changes:
        # A missing task or a stale ETag answers as such before any tag is resolved (one
        # could be at the limit); resolved (under the user's tag lock), the tags are locked
        # before the task, as a tag's rename or deletion locks them (`_change_tag`).
        _check_version(queries.get_task(session, user_id, task_id), if_match, if_none_match)
        resolved = tag_queries.resolve(session, user_id, list(changes["tags"]))
    # A completion may tag a next occurrence: the tag lock before the task.
    current = queries.lock_task(session, user_id, task_id, tag_lock="completed" in changes)
    _check_version(current, if_match, if_none_match)
    return _apply(session, ctx, current, changes, resolved)


def set_completed(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    completed: bool | None,
    *,
    if_match: ETags | None = None,
    if_none_match: ETags | None = None,
) -> TaskChange:
    """Set the completion flag, or toggle it when `completed` is None (atomic under the lock).
    The user's tag lock comes before the task's: a next occurrence gets the task's tags."""
    current = queries.lock_task(session, user_id, task_id, tag_lock=True)
    _check_version(current, if_match, if_none_match)
    target = (not current.completed) if completed is None else completed
    return _apply(session, ctx, current, {"completed": target})


def delete_task(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    task_id: int,
    *,
    if_match: ETags | None = None,
    if_none_match: ETags | None = None,
) -> TaskDeletion:
    current = queries.lock_task(session, user_id, task_id)
    _check_version(current, if_match, if_none_match)
    statement = queries.delete_statement(current.user_id, current.id)
    _, event = _write(session, ctx, "task.deleted", statement, current, None)
    return TaskDeletion(task=current, event=event)


def _change_tag(
    session: Session,
    ctx: AuditContext,
    user_id: str,
    tag_id: int,
    change: Callable[[], None],
    *,
    new_name: str | None = None,
) -> list[RecordedEvent]:
    """Rename (to `new_name`) or delete a tag, recording the change of every task that
    carries it. A rename that finds, once it holds the lock, the name already given (an
    identical rename committed while it waited) changes nothing, as one to the current name.

    The user's tag lock, alone, then the tag, then its tasks in id order: the order every
    write takes them in (a write using tags holds the tag lock shared before any tag or task),
    so none deadlocks with this one. Once the tag is locked no task can be tagged with it, so
    the tasks read then are all of them; one deleted or untagged while this waited for its
    lock is left alone (its own event says so). No write creating a name runs meanwhile, so a
    rename's new name never waits for another's uncommitted one.
    """
    _, name = tag_queries.lock_tag(session, user_id, tag_id)
    if name == new_name:
        return []
    befores = {}
    for task_id in tag_queries.tagged_task_ids(session, user_id, tag_id):
        before = queries.lock_task_if_exists(session, user_id, task_id)
        if before is not None and name in before.tags:
            befores[task_id] = before
    change()
    events = []
    for task_id, before in befores.items():
        after = queries.update_fields(
            session, user_id, task_id, {}, _next_timestamp(before.updated_at)
        )
        events.append(_record(session, ctx, "task.updated", task_id, user_id, before, after))
    return events


def rename_tag(
    session: Session, ctx: AuditContext, user_id: str, tag_id: int, name: str
) -> list[RecordedEvent]:
    """Rename a tag; each task carrying it records the new name in its history."""
    if tag_queries.get_tag(session, user_id, tag_id).name == name:  # 404 before any lock
        return []
    tag_queries.check_name_free(session, user_id, tag_id, name)  # 409 before any lock
    return _change_tag(
        session,
        ctx,
        user_id,
        tag_id,
        lambda: tag_queries.rename(session, user_id, tag_id, name),
        new_name=name,
    )


def delete_tag(
    session: Session, ctx: AuditContext, user_id: str, tag_id: int
) -> list[RecordedEvent]:
    """Delete a tag; each task that carried it records the removal in its history."""
    tag_queries.get_tag(session, user_id, tag_id)
    return _change_tag(
        session, ctx, user_id, tag_id, lambda: tag_queries.remove(session, user_id, tag_id)
    )
