"""Every task statement, built once, and the records they return: for the API, the rules and
the CLI alike. Reads filter by the owner; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Row, String, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from audit.chain import format_timestamp
from service.exceptions import NotFound
from service.tasks.models import TASKS
from service.users import USERS

_COLUMNS = (
    TASKS.c.id,
    TASKS.c.user_id,
    TASKS.c.title,
    TASKS.c.description,
    TASKS.c.completed,
    TASKS.c.created_at,
    TASKS.c.updated_at,
    TASKS.c.version,
)


class StatusFilter(StrEnum):
    all = "all"
    pending = "pending"
    completed = "completed"


class SortField(StrEnum):
    created_at = "created_at"
    updated_at = "updated_at"
    title = "title"  # type: ignore[assignment]  # shadows str.title; only the value is used


class SortOrder(StrEnum):
    asc = "asc"
    desc = "desc"


def etag_for(task_id: int, version: int) -> str:
    return f'"{task_id}-{version}"'


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int

    @classmethod
    def from_row(cls, row: Row[Any]) -> TaskRecord:
        return cls(*row)

    def state(self) -> dict[str, Any]:
        """The task as JSON, as the audit log records it."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "title": self.title,
            "description": self.description,
            "completed": self.completed,
            "created_at": format_timestamp(self.created_at),
            "updated_at": format_timestamp(self.updated_at),
        }

    @property
    def etag(self) -> str:
        return etag_for(self.id, self.version)


# Responses are dumped straight from the records, without building TaskPublic models (4x
# faster for a page); they dump to TaskPublic's fields, less the internal `version`.
_RECORD = TypeAdapter(TaskRecord)
_RECORDS = TypeAdapter(list[TaskRecord])
_INTERNAL: Any = {"version"}


def public(task: TaskRecord) -> dict[str, Any]:
    """The task as the API shows it, as JSON-ready values."""
    shown: dict[str, Any] = _RECORD.dump_python(task, mode="json", exclude=_INTERNAL)
    return shown


def public_json(task: TaskRecord) -> bytes:
    return _RECORD.dump_json(task, exclude=_INTERNAL)


def public_list_json(records: list[TaskRecord]) -> bytes:
    return _RECORDS.dump_json(records, exclude={"__all__": _INTERNAL})


@dataclass(frozen=True, slots=True)
class TaskPage:
    items: list[TaskRecord]
    total: int


# The hot statements are built once, with bound parameters: SQLAlchemy then reuses their
# cache key and compiled form instead of rebuilding both on every request.
_OWNED = and_(TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner"))
_SELECT_OWNED = select(*_COLUMNS).where(_OWNED)
_LOCK_OWNED = _SELECT_OWNED.with_for_update()
_INSERT = (
    insert(TASKS)
    .values(
        user_id=bindparam("owner"),
        title=bindparam("title"),
        description=bindparam("description"),
        completed=False,
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
        version=1,
    )
    .returning(*_COLUMNS)
)
_DELETE = delete(TASKS).where(TASKS.c.id == bindparam("task_id"))
_TASK_COUNT = select(USERS.c.task_count).where(USERS.c.id == bindparam("owner"))


@lru_cache(maxsize=8)
def _update_statement(fields: tuple[str, ...]) -> Any:
    """UPDATE of these fields (at most 7 combinations of title, description, completed)."""
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    return (
        update(TASKS)
        .where(TASKS.c.id == bindparam("task_id"))
        .values(**values, updated_at=bindparam("now"), version=TASKS.c.version + 1)
        .returning(*_COLUMNS)
    )


@lru_cache(maxsize=64)
def _list_statements(status: StatusFilter, search: bool, sort: SortField, order: SortOrder) -> Any:
    """The page query and its count, per combination of filters and order."""
    conditions: list[Any] = [TASKS.c.user_id == bindparam("owner")]
    if status is StatusFilter.pending:
        conditions.append(TASKS.c.completed.is_(False))
    elif status is StatusFilter.completed:
        conditions.append(TASKS.c.completed.is_(True))
    if search:
        pattern = bindparam("pattern", type_=String())
        conditions.append(
            or_(
                func.lower(TASKS.c.title).like(func.lower(pattern), escape="\\"),
                func.lower(TASKS.c.description).like(func.lower(pattern), escape="\\"),
            )
        )
    sort_column = TASKS.c[sort.value]
    if order is SortOrder.desc:
        ordering = (sort_column.desc(), TASKS.c.id.desc())
    else:
        ordering = (sort_column.asc(), TASKS.c.id.asc())
    page = (
        select(*_COLUMNS)
        .where(*conditions)
        .order_by(*ordering)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    count = select(func.count()).select_from(TASKS).where(*conditions)
    return page, count


def _contains_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, with `%`, `_` and the escape taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def get_task(session: Session, user_id: str, task_id: int) -> TaskRecord:
    row = session.execute(_SELECT_OWNED, {"task_id": task_id, "owner": user_id}).first()
    if row is None:
        raise NotFound(f"Task {task_id} not found.")
    return TaskRecord.from_row(row)


def lock_task(session: Session, user_id: str, task_id: int) -> TaskRecord:
    """Read the before-state under a row lock: concurrent writers to one task queue here."""
    row = session.execute(_LOCK_OWNED, {"task_id": task_id, "owner": user_id}).first()
    if row is None:
        raise NotFound(f"Task {task_id} not found.")
    return TaskRecord.from_row(row)


def list_tasks(
    session: Session,
    user_id: str,
    *,
    status: StatusFilter = StatusFilter.all,
    q: str | None = None,
    sort: SortField = SortField.created_at,
    order: SortOrder = SortOrder.desc,
    limit: int = 100,
    offset: int = 0,
) -> TaskPage:
    page, count = _list_statements(status, bool(q), sort, order)
    params: dict[str, Any] = {"owner": user_id, "limit": limit, "offset": offset}
    if q:
        params["pattern"] = _contains_pattern(q)
    items = [TaskRecord.from_row(row) for row in session.execute(page, params)]
    if offset == 0 and len(items) < limit:
        total = len(items)
    elif status is StatusFilter.all and not q:
        # Kept by the database on every insert and delete: no need to count the rows.
        total = session.execute(_TASK_COUNT, {"owner": user_id}).scalar() or 0
    else:
        total = session.execute(count, params).scalar_one()
    return TaskPage(items=items, total=int(total))


def insert_task(
    session: Session, user_id: str, title: str, description: str | None, now: datetime
) -> TaskRecord:
    params = {"owner": user_id, "title": title, "description": description, "now": now}
    return TaskRecord.from_row(session.execute(_INSERT, params).one())


def update_fields(
    session: Session, task_id: int, values: dict[str, Any], now: datetime
) -> TaskRecord:
    """Write these fields (a subset of title, description, completed) and bump the version."""
    fields = tuple(column.name for column in TASKS.c if column.name in values)  # table order
    params = {f"new_{name}": values[name] for name in fields}
    params.update(task_id=task_id, now=now)
    return TaskRecord.from_row(session.execute(_update_statement(fields), params).one())


def delete_row(session: Session, task_id: int) -> None:
    session.execute(_DELETE, {"task_id": task_id})
