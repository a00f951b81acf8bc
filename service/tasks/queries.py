"""Every task statement, built once, and the records they return: for the API, the rules and
the CLI alike. Reads and writes filter by the owner: a write follows `lock_task`, which
checks it, but one made without the lock still finds no other user's row. Nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from functools import cache, lru_cache
from typing import Any, NamedTuple, cast

from pydantic import TypeAdapter
from sqlalchemy import (
    ARRAY,
    CTE,
    BigInteger,
    Select,
    String,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy import cast as cast_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from audit.append import ChangeBuilder, build_append, head_exists
from service import paging
from service.exceptions import NotFound
from service.limits import PAGE_SIZE_DEFAULT
from service.priority import Priority
from service.sqltypes import utcnow
from service.tags.models import Tag, TaskTag
from service.tags.queries import holding_tag_lock, tag_ids_named
from service.tasks.models import TASKS, TaskCreate, TaskPublic, TaskRecord
from service.text import control_error, is_utf8
from service.users import USERS

TAGS = Tag.__table__  # type: ignore[attr-defined]
TASK_TAGS = TaskTag.__table__  # type: ignore[attr-defined]
# A task's tag names in one array per row (TaskRecord sorts them: the same on every server).
_TAG_NAMES = (
    select(
        func.coalesce(func.array_agg(TAGS.c.name, type_=ARRAY(String)), literal([], ARRAY(String)))
    )
    .select_from(TASK_TAGS.join(TAGS, TAGS.c.id == TASK_TAGS.c.tag_id))
    .where(TASK_TAGS.c.task_id == TASKS.c.id)
    .correlate(TASKS)
    .scalar_subquery()
    .label("tags")
)
# Every query returns whole records: the columns in TaskRecord's order (tags from task_tags).
_COLUMNS = tuple(
    _TAG_NAMES if field.name == "tags" else TASKS.c[field.name] for field in fields(TaskRecord)
)
# A new task has no tags yet (they are linked after the insert); a correlated subquery in an
# INSERT's RETURNING would not be correlated to the new row.
_NEW_COLUMNS = tuple(
    literal([], ARRAY(String)).label("tags") if column is _TAG_NAMES else column
    for column in _COLUMNS
)


class StatusFilter(StrEnum):
    all = "all"
    pending = "pending"
    completed = "completed"


class SortField(StrEnum):
    created_at = "created_at"
    updated_at = "updated_at"
    title = "title"  # type: ignore[assignment]  # shadows str.title; only the value is used
    due_at = "due_at"
    priority = "priority"


class SortOrder(StrEnum):
    asc = "asc"
    desc = "desc"


# --- The list's keyset cursor (service.paging) -----------------------------------------


@dataclass(frozen=True, slots=True)
class After:
    """Where a page continues: after the task with this sort value and id."""

    value: Any
    id: int


def encode_after(task: TaskRecord, sort: SortField, order: SortOrder) -> str:
    """The sort, the order, and the last task's sort value and id."""
    return paging.encode("tasks", sort.value, order.value, getattr(task, sort.value), task.id)


def _nullable(sort: SortField) -> bool:
    """A sort on a nullable column (due_at) puts the tasks without a value last, in both
    orders, and pages through them after the others (`_then_undated`)."""
    return bool(TASKS.c[sort.value].nullable)


def _parse_value(value: Any, sort: SortField) -> Any:
    """A cursor's sort value, of the sort column's type; anything else is a ValueError."""
    column = TASKS.c[sort.value]
    sql_type = column.type.impl if isinstance(column.type, TypeDecorator) else column.type
    if sort is SortField.title:
        # Text a title may hold (a NUL or a lone surrogate would fail in the driver).
        if isinstance(value, str) and value and control_error(value) is None and is_utf8(value):
            return value
    elif sort is SortField.priority:
        if isinstance(value, str) and value in Priority.__members__:
            return Priority(value)
    elif value is None:
        if _nullable(sort):
            return None
    elif sql_type.python_type is datetime:
        return paging.aware_time(value)
    elif sql_type.python_type is int and type(value) is int:
        return value
    raise ValueError(value)


def decode_after(cursor: str, sort: SortField, order: SortOrder) -> After:
    """What `encode_after` wrote for this sort and order; anything else is a 400."""
    try:
        sort_, order_, value, task_id = paging.decode(cursor, "tasks")
        if (sort_, order_) != (sort.value, order.value):
            raise ValueError(sort_)
        return After(_parse_value(value, sort), paging.item_id(task_id))
    except (ValueError, TypeError):
        raise paging.invalid() from None


def _sort_key(sort: SortField) -> tuple[Any, ...]:
    """The columns a sort orders by, the id last. Titles as people read them, case aside."""
    if sort is SortField.title:
        return (func.lower(TASKS.c.title), TASKS.c.title, TASKS.c.id)
    return (TASKS.c[sort.value], TASKS.c.id)


def _after_condition(sort: SortField, order: SortOrder, after_null: bool) -> Any:
    """The tasks that follow `after` in this order (tasks without a value last)."""
    column = TASKS.c[sort.value]
    value = bindparam("after_value", type_=column.type)
    after_id = bindparam("after_id", type_=BigInteger)
    if after_null:  # past the last value: among the tasks without one, by id
        later_id = TASKS.c.id > after_id if order is SortOrder.asc else TASKS.c.id < after_id
        return and_(column.is_(None), later_id)
    keys = _sort_key(sort)
    bound = (func.lower(value), value, after_id) if sort is SortField.title else (value, after_id)
    row, start = tuple_(*keys), tuple_(*bound)
    return row > start if order is SortOrder.asc else row < start


# Responses are dumped straight from the records as `TaskPublic` (the internal fields left
# out), without building a model per task: a 50-task page serializes 4x faster.
_PUBLIC = TypeAdapter(TaskPublic)
_PUBLIC_LIST = TypeAdapter(list[TaskPublic])


def public(task: TaskRecord) -> dict[str, Any]:
    """The task as the API shows it, as JSON-ready values."""
    shown: dict[str, Any] = _PUBLIC.dump_python(task, mode="json")
    return shown


def public_json(task: TaskRecord) -> bytes:
    return _PUBLIC.dump_json(task)


def public_list_json(records: list[TaskRecord]) -> bytes:
    return _PUBLIC_LIST.dump_json(cast(list[TaskPublic], records))


@dataclass(frozen=True, slots=True)
class TaskPage:
    items: list[TaskRecord]
    total: int
    # Whether tasks follow this page (in its order, after its last task).
    more: bool = False


# The hot statements are built once, with bound parameters: SQLAlchemy then reuses their
# cache key and compiled form instead of rebuilding both on every request.
_OWNED = and_(TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner"))
_SELECT_OWNED = select(*_COLUMNS).where(_OWNED)
# With the lock, the version as the statement's snapshot saw it. A writer that had to wait
# gets the task's newest row, but the tags subquery still reads that older snapshot: when
# the two versions differ, the record is read again (`lock_task`).
_SEEN = TASKS.alias("seen")
_SEEN_VERSION = (
    select(_SEEN.c.version).where(_SEEN.c.id == TASKS.c.id).scalar_subquery().label("seen")
)
_LOCK_OWNED = select(*_COLUMNS, _SEEN_VERSION).where(_OWNED).with_for_update(of=TASKS)
# The same, after the user's tag lock (shared), in the same round trip.
_LOCK_OWNED_AFTER_TAGS = (
    select(*_COLUMNS, _SEEN_VERSION).where(_OWNED, holding_tag_lock()).with_for_update(of=TASKS)
)
# The columns a client gives (TaskCreate's fields but the tags), each bound under its name.
INSERTED_FIELDS = tuple(name for name in TaskCreate.model_fields if name != "tags")
# An id for a recurring task's next occurrence, taken before the completion is recorded, so
# the completed task's event can already name it.
_NEXT_ID = select(func.nextval(func.pg_get_serial_sequence("tasks", "id")))
_TASK_COUNT = select(USERS.c.task_count).where(USERS.c.id == bindparam("owner"))


# The audited writes: each one statement with its audit event (`audit.append.build_append`).
# The change happens only where the chain head exists (`FROM head`, or `head_exists`).


@dataclass(frozen=True, slots=True)
class Audited:
    """A change's statement (its event's values still to bind) and the change's parameters."""

    statement: Select[Any]
    params: dict[str, Any]


def _typed(name: str, column: str | None = None) -> Any:
    """A bound value cast to its column's type (an INSERT ... SELECT does not infer it)."""
    column_type = TASKS.c[column or name].type
    return cast_(bindparam(name, type_=column_type), column_type)


def _insert_change(with_id: bool) -> ChangeBuilder:
    def build(head: CTE) -> Any:
        values: dict[str, Any] = {
            "user_id": _typed("owner", "user_id"),
            **{name: _typed(name) for name in INSERTED_FIELDS},
            "previous_task_id": _typed("previous_task_id"),
            "completed": false(),
            "created_at": _typed("now", "created_at"),
            "updated_at": _typed("now", "updated_at"),
            "version": literal(1),
        }
        if with_id:
            values["id"] = _typed("id")
        row = select(*(value.label(name) for name, value in values.items())).select_from(head)
        return insert(TASKS).from_select(list(values), row).returning(*_NEW_COLUMNS)

    return build


def _link_tags(change: CTE) -> Any:
    """A new task's tag links, from the ids its tags were resolved to."""
    tag_ids = func.unnest(bindparam("tag_ids", type_=ARRAY(BigInteger)))
    return insert(TASK_TAGS).from_select(
        ["task_id", "tag_id", "user_id"], select(change.c.id, tag_ids, change.c.user_id)
    )


@cache
def _create_statement(with_id: bool) -> Select[Any]:
    return build_append(_insert_change(with_id), new_entity=not with_id, dependents=[_link_tags])


@lru_cache(maxsize=256)
def _audited_update_statement(fields: tuple[str, ...]) -> Select[Any]:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}

    def build(head: CTE) -> Any:
        return (
            update(TASKS)
            .where(_OWNED, head_exists(head))
            .values(**values, updated_at=bindparam("now"), version=TASKS.c.version + 1)
            .returning(*_COLUMNS)
        )

    return build_append(build)


@cache
def _delete_statement() -> Select[Any]:
    def build(head: CTE) -> Any:
        return delete(TASKS).where(_OWNED, head_exists(head)).returning(TASKS.c.id)

    return build_append(build)


def record_of(row: Any) -> TaskRecord:
    """The task's columns of an audited statement's row (the event's columns follow)."""
    return TaskRecord.from_row(tuple(row)[: len(_COLUMNS)])


def create_statement(draft: TaskRecord, tag_ids: list[int], *, explicit_id: bool) -> Audited:
    """Insert `draft` (its id too with `explicit_id`, else the database's) and its tag links."""
    params = {name: getattr(draft, name) for name in INSERTED_FIELDS}
    params.update(
        owner=draft.user_id,
        now=draft.created_at,
        previous_task_id=draft.previous_task_id,
        tag_ids=tag_ids,
    )
    if explicit_id:
        params["id"] = draft.id
    return Audited(_create_statement(explicit_id), params)


def update_statement(user_id: str, task_id: int, values: dict[str, Any], now: datetime) -> Audited:
    """Write these columns of the user's locked task and bump its version."""
    fields = tuple(column.name for column in TASKS.c if column.name in values)  # table order
    params = {f"new_{name}": values[name] for name in fields}
    params.update(task_id=task_id, owner=user_id, now=now)
    return Audited(_audited_update_statement(fields), params)


def delete_statement(user_id: str, task_id: int) -> Audited:
    return Audited(_delete_statement(), {"task_id": task_id, "owner": user_id})


@lru_cache(maxsize=256)
def _update_statement(fields: tuple[str, ...]) -> Any:
    """UPDATE of these columns (one statement per combination in use)."""
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    return (
        update(TASKS)
        .where(_OWNED)
        .values(**values, updated_at=bindparam("now"), version=TASKS.c.version + 1)
        .returning(*_COLUMNS)
    )


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """The list's filters; each one given narrows the list (tags: all of them)."""

    status: StatusFilter = StatusFilter.all
    q: str | None = None
    priorities: tuple[Priority, ...] = ()
    tags: tuple[str, ...] = ()
    due_before: datetime | None = None
    due_after: datetime | None = None
    overdue: bool = False

    @property
    def narrows(self) -> bool:
        """Whether the list's statement filters at all (an empty `q` does not): as its shape
        says, which decides whether the page carries the user's running count."""
        return self.shape(len(self.tags)) != _UNFILTERED

    def shape(self, tag_count: int) -> tuple[Any, ...]:
        """What the statement depends on (not the values, which are bound), with the number
        of distinct tags the tag filter names."""
        return (
            self.status,
            bool(self.q),
            bool(self.priorities),
            tag_count,
            self.due_before is not None,
            self.due_after is not None,
            self.overdue,
        )

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.q:
            params["pattern"] = _contains_pattern(self.q)
        if self.priorities:
            params["priorities"] = [p.value for p in self.priorities]
        if self.due_before is not None:
            params["due_before"] = self.due_before
        if self.due_after is not None:
            params["due_after"] = self.due_after
        if self.overdue:
            params["now"] = utcnow()
        return params


def _conditions(shape: tuple[Any, ...], *, counting: bool) -> list[Any]:
    status, search, priorities, tags, due_before, due_after, overdue = shape
    conditions: list[Any] = [TASKS.c.user_id == bindparam("owner")]
    if status is StatusFilter.pending:
        conditions.append(TASKS.c.completed.is_(False))
    elif status is StatusFilter.completed:
        conditions.append(TASKS.c.completed.is_(True))
    if search:
        pattern = search_fold(bindparam("pattern", type_=String()))
        conditions.append(
            or_(
                search_fold(TASKS.c.title).like(pattern, escape="\\"),
                search_fold(TASKS.c.description).like(pattern, escape="\\"),
            )
        )
    if priorities:
        conditions.append(TASKS.c.priority.in_(bindparam("priorities", expanding=True)))
    if tags == 1 and not counting:
        # A page with one tag: the tasks in the page's order, each one's link probed
        # (task_tags_pkey); the planner may instead start from the tag's links.
        conditions.append(
            select(TASK_TAGS.c.task_id)
            .where(TASK_TAGS.c.task_id == TASKS.c.id, TASK_TAGS.c.tag_id == bindparam("tag_0"))
            .exists()
        )
    elif tags:
        # The tasks carrying all the tags, from the tags' links (ix_task_tags_tag): bounded by
        # the links of those tags, however rarely they come together.
        tag_ids: list[Any] = [bindparam(f"tag_{n}") for n in range(tags)]
        tagged = (
            select(TASK_TAGS.c.task_id)
            .where(TASK_TAGS.c.tag_id.in_(tag_ids))
            .group_by(TASK_TAGS.c.task_id)
            .having(func.count() == tags)
        )
        conditions.append(TASKS.c.id.in_(tagged))
    if due_before:
        conditions.append(TASKS.c.due_at < bindparam("due_before"))
    if due_after:
        conditions.append(TASKS.c.due_at > bindparam("due_after"))
    if overdue:
        conditions.append(TASKS.c.due_at < bindparam("now"))
        conditions.append(TASKS.c.completed.is_(False))
    return conditions


_UNFILTERED = TaskFilter().shape(0)


@lru_cache(maxsize=512)
def _list_statements(
    shape: tuple[Any, ...], sort: SortField, order: SortOrder, after: bool | None
) -> Any:
    """The page query and its count, per combination of filters and order; `after` None for
    a first page, else whether the page continues after a task without a due date."""
    filters = _conditions(shape, counting=False)
    conditions = filters if after is None else [*filters, _after_condition(sort, order, after)]
    *keys, id_key = _sort_key(sort)
    if order is SortOrder.desc:
        # Tasks without a value (a due date) come last in both orders: a nullable sort column
        # needs a DESC NULLS LAST index for this order (ix_tasks_user_due_desc). The NOT NULL
        # ones get no NULLS LAST, which would keep PostgreSQL from reading their indexes
        # backwards.
        ordering = [key.desc() for key in keys]
        if _nullable(sort):
            ordering = [ordering[0].nulls_last()]
        ordering.append(id_key.desc())
    else:  # NULLS LAST is the ascending default
        ordering = [*(key.asc() for key in keys), id_key.asc()]
    page: Any = select(*_COLUMNS).where(*conditions).order_by(*ordering)
    if _nullable(sort) and after is False:
        page = _then_undated(page, filters, ordering, order, TASKS.c[sort.value])
    if shape == _UNFILTERED:
        # Each row also carries the user's running count (X-Total-Count): one statement and
        # one snapshot for the page and its total.
        page = page.add_columns(_TASK_COUNT.scalar_subquery().label("total"))
    page = page.limit(bindparam("limit")).offset(bindparam("offset"))
    count = select(func.count()).select_from(TASKS).where(*_conditions(shape, counting=True))
    return page, count


def _then_undated(
    dated: Select[Any], conditions: list[Any], ordering: list[Any], order: SortOrder, column: Any
) -> Any:
    """After a task with a due date, a page goes on with the later due dates and then the
    tasks without one. Asked as one OR, PostgreSQL reads the index from the user's first task
    up to the cursor (40 ms deep into 100,000 tasks); as two index ranges, each a page long
    at most, a page costs the same at any depth. The undated part keeps the due-date order
    (constant there) so that it is a range of the same index: ordered by id alone, the
    planner may walk the primary key through every user's tasks for a page that has none."""
    enough: Any = bindparam("limit") + bindparam("offset")
    undated = select(*_COLUMNS).where(*conditions, column.is_(None)).order_by(*ordering)
    both = union_all(dated.limit(enough), undated.limit(enough)).subquery("page")
    due, task_id = both.c[column.name], both.c.id
    if order is SortOrder.asc:
        return select(both).order_by(due.asc().nulls_last(), task_id.asc())
    return select(both).order_by(due.desc().nulls_last(), task_id.desc())


def search_fold(text: Any) -> Any:
    """What `q` compares, on both sides: lower case, and the two letters whose capitals
    lower() cannot map back (a final sigma, and ß, capitalized SS). The trigram indexes
    (models.TRIGRAM_INDEXES, migration 0017) are on this expression."""
    final_sigma, sigma = "\u03c2", "\u03c3"
    return func.replace(func.translate(func.lower(text), final_sigma, sigma), "ß", "ss")


def _contains_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, with `%`, `_` and the escape taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def get_task(session: Session, user_id: str, task_id: int) -> TaskRecord:
    row = session.execute(_SELECT_OWNED, {"task_id": task_id, "owner": user_id}).first()
    if row is None:
        raise NotFound(f"Task {task_id} not found.")
    return TaskRecord.from_row(row)


def lock_task(
    session: Session, user_id: str, task_id: int, *, tag_lock: bool = False
) -> TaskRecord:
    """Read the before-state under a row lock: concurrent writers to one task queue here.
    With `tag_lock`, the user's tag lock (shared) first, for a write that may then lock tags
    (a completion tagging the next occurrence)."""
    task = lock_task_if_exists(session, user_id, task_id, tag_lock=tag_lock)
    if task is None:
        raise NotFound(f"Task {task_id} not found.")
    return task


def lock_task_if_exists(
    session: Session, user_id: str, task_id: int, *, tag_lock: bool = False
) -> TaskRecord | None:
    """`lock_task`, or None for a task that is gone (also one deleted while this waited).

    After a wait, the tags are read again by a second statement, which sees what the writer
    before this one committed (the lock is already held, so nothing changes in between).
    """
    params = {"task_id": task_id, "owner": user_id}
    row = session.execute(_LOCK_OWNED_AFTER_TAGS if tag_lock else _LOCK_OWNED, params).first()
    if row is not None and row.seen != row.version:
        row = session.execute(_LOCK_OWNED, params).first()
    return None if row is None else TaskRecord.from_row(row[:-1])  # without `seen`


class ListQuery(NamedTuple):
    page: Any
    count: Any
    params: dict[str, Any]


def list_query(
    session: Session | Connection,
    user_id: str,
    filters: TaskFilter,
    sort: SortField,
    order: SortOrder,
    *,
    limit: int,
    offset: int,
    after: After | None = None,
) -> ListQuery | None:
    """The list's page and count statements with their values, as the service sends them
    (bench/explain.py plans the same); None when a tag filter names no tag of the user. The
    page asks for one task more than `limit`: whether another page follows."""
    tag_ids = tag_ids_named(session, user_id, filters.tags) if filters.tags else []
    if tag_ids is None:
        return None
    after_null = None if after is None else after.value is None
    page, count = _list_statements(filters.shape(len(tag_ids)), sort, order, after_null)
    params: dict[str, Any] = {"owner": user_id, "limit": limit + 1, "offset": offset}
    if after is not None:
        params.update(after_value=after.value, after_id=after.id)
    params.update(filters.params())
    params.update({f"tag_{n}": tag_id for n, tag_id in enumerate(tag_ids)})
    return ListQuery(page, count, params)


def list_tasks(
    session: Session,
    user_id: str,
    *,
    filters: TaskFilter | None = None,
    status: StatusFilter = StatusFilter.all,
    q: str | None = None,
    sort: SortField = SortField.created_at,
    order: SortOrder = SortOrder.desc,
    limit: int = PAGE_SIZE_DEFAULT,
    offset: int = 0,
    after: After | None = None,
) -> TaskPage:
    if filters is None:
        filters = TaskFilter(status=status, q=q or None)
    query = list_query(
        session, user_id, filters, sort, order, limit=limit, offset=offset, after=after
    )
    if query is None:  # a name the user has no tag of: nothing can match
        return TaskPage(items=[], total=0)
    page, count, params = query
    rows = session.execute(page, params).all()
    counted = not filters.narrows  # the page's last column is the user's running count
    if counted:
        items = [TaskRecord.from_row(row[:-1]) for row in rows]
    else:
        items = [TaskRecord.from_row(row) for row in rows]
    more = len(items) > limit
    del items[limit:]
    total: Any
    if offset == 0 and after is None and not more:
        total = len(items)
    elif counted:
        # Kept by the database on every insert and delete: no need to count the rows. A page
        # past the end has no row to carry it.
        total = rows[0][-1] if rows else session.execute(_TASK_COUNT, {"owner": user_id}).scalar()
    else:
        total = session.execute(count, params).scalar_one()
    return TaskPage(items=items, total=int(total or 0), more=more)


def next_task_id(session: Session) -> int:
    return int(session.execute(_NEXT_ID).scalar_one())


def update_fields(
    session: Session, user_id: str, task_id: int, values: dict[str, Any], now: datetime
) -> TaskRecord:
    """Write these columns of the user's task (none: only the version and updated_at, as for
    a change of the tags alone) and bump the version."""
    fields = tuple(column.name for column in TASKS.c if column.name in values)  # table order
    params = {f"new_{name}": values[name] for name in fields}
    params.update(task_id=task_id, owner=user_id, now=now)
    return TaskRecord.from_row(session.execute(_update_statement(fields), params).one())
