"""A task's fields: the `tasks` table, the request bodies, and the record every query returns
(whose public part is the response body and the audit log's snapshot).

To add a field, see "Where to add a new task field" in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import Field as PField
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import ENUM
from sqlmodel import Field, SQLModel

from audit.chain import format_timestamp
from audit.schemas import ClientTime
from service.limits import USER_ID_MAX
from service.priority import Priority
from service.sqltypes import ID_TYPE, UTCDateTime
from service.tags.rules import TagNames, sorted_names
from service.tasks import recurrence
from service.text import (
    EDGE,
    KEPT,
    MULTI_LINE_PATTERN,
    SHOWN,
    WHITESPACE,
    control_error,
    is_blank,
    is_utf8,
)

TITLE_MAX = 200
SEARCH_MAX = 200  # the list's `q` (a Query bound in the route) and `tasks list --q`
DESCRIPTION_MAX = 1000
# A reminder still to fire: set, on a task not completed, and not fired for this time yet
# (a write changing `remind_at` clears `reminder_fired_for`: it is armed again).
REMINDER_UNFIRED = (
    "remind_at IS NOT NULL AND NOT completed AND reminder_fired_for IS DISTINCT FROM remind_at"
)


PRIORITY_TYPE = ENUM(*Priority, name="task_priority", create_type=False)


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(f"length(title) BETWEEN 1 AND {TITLE_MAX}", name="ck_tasks_title_length"),
        CheckConstraint(
            f"description IS NULL OR length(description) <= {DESCRIPTION_MAX}",
            name="ck_tasks_description_length",
        ),
        # The list endpoint pages a user's tasks by these orders.
        Index("ix_tasks_user_created", "user_id", "created_at", "id"),
        Index("ix_tasks_user_updated", "user_id", "updated_at", "id"),
        # Titles as people read them: case aside first (service.tasks.queries._sort_key).
        Index("ix_tasks_user_title", "user_id", text("lower(title)"), "title", "id"),
        # Due dates both ways, tasks without one last in each (NULLS LAST).
        Index("ix_tasks_user_due", "user_id", "due_at", "id"),
        Index("ix_tasks_user_due_desc", "user_id", text("due_at DESC NULLS LAST"), text("id DESC")),
        Index("ix_tasks_user_priority", "user_id", "priority", "id"),
        Index("ix_tasks_user_completed", "user_id", "completed", "created_at", "id"),
        # Open tasks by due date: counts of status=pending and overdue=true read only these.
        Index(
            "ix_tasks_user_pending",
            "user_id",
            "due_at",
            "priority",
            postgresql_where=text("completed IS FALSE"),
        ),
        # The target of task_tags' foreign key: a task carries only its own user's tags.
        UniqueConstraint("id", "user_id", name="uq_tasks_id_user"),
        # A task makes at most one next occurrence of its series.
        Index(
            "uq_tasks_previous",
            "previous_task_id",
            unique=True,
            postgresql_where=text("previous_task_id IS NOT NULL"),
        ),
        CheckConstraint(
            "recurrence IS NULL OR due_at IS NOT NULL", name="ck_tasks_recurrence_needs_due"
        ),
        CheckConstraint(
            "remind_at IS NULL OR due_at IS NULL OR remind_at <= due_at",
            name="ck_tasks_remind_before_due",
        ),
        # The reminder workers' claim: due reminders not fired yet, oldest first.
        Index(
            "ix_tasks_reminder_due",
            "remind_at",
            "id",
            postgresql_where=text(REMINDER_UNFIRED),
        ),
        # A user's reminders, by time (GET /reminders).
        Index(
            "ix_tasks_user_remind",
            "user_id",
            "remind_at",
            "id",
            postgresql_where=text("remind_at IS NOT NULL"),
        ),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(ID_TYPE, Identity(always=False), primary_key=True),
    )
    user_id: str = Field(
        sa_column=Column(String(USER_ID_MAX), ForeignKey("users.id"), nullable=False)
    )
    title: str = Field(sa_column=Column(String(TITLE_MAX), nullable=False))
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    completed: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    priority: Priority = Field(
        default=Priority.none,
        sa_column=Column(PRIORITY_TYPE, nullable=False, server_default=text("'none'")),
    )
    due_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    recurrence: str | None = Field(
        default=None, sa_column=Column(String(recurrence.RULE_MAX), nullable=True)
    )
    # The series of a recurring task (no foreign keys: a deleted task keeps its place).
    previous_task_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    next_task_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    remind_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    # Bumped on every change; the ETag is derived from it.
    version: int = Field(
        default=1, sa_column=Column(Integer, nullable=False, server_default=text("1"))
    )
    # The reminder that fired last (service.reminders): for which `remind_at`, when, and
    # whether it was late. Not part of the task's representation, so firing changes neither
    # `updated_at` nor the ETag.
    reminder_fired_for: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    reminder_fired_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    reminder_late: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )


TASKS = Task.__table__  # type: ignore[attr-defined]


# `q` searches with `lower(column) LIKE '%text%'`, which trigram (pg_trgm) GIN indexes serve.
# They are made by the migration only where the server has pg_trgm (PostgreSQL's contrib: the
# system server and Neon do; the embedded server does not), so they are not declared on the
# table: `alembic check` and tests/test_task_fields.py skip them by name.
TRIGRAM_INDEXES = {"ix_tasks_title_trgm": "title", "ix_tasks_description_trgm": "description"}


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's filter: the optional trigram indexes are not schema drift."""
    return not (type_ == "index" and name in TRIGRAM_INDEXES)


# Fields a client may not set to null (absent is fine in an update): the NOT NULL columns,
# and the tags (`[]` removes them).
_NOT_NULL = frozenset(column.name for column in TASKS.c if not column.nullable) | {"tags"}


# --- API models ------------------------------------------------------------


def _clean_title(value: str) -> str:
    """Trimmed first (a trailing newline from a form is not an error), then one line: no
    control characters in what is kept."""
    value = value.strip()
    if error := control_error(value):
        raise ValueError(error)
    if is_blank(value):
        raise ValueError("must not be blank")
    if len(value) > TITLE_MAX:
        raise ValueError(f"must be at most {TITLE_MAX} characters")
    return value


def _multi_line(value: str | None) -> str | None:
    if value is not None and (error := control_error(value, multi_line=True)):
        raise ValueError(error)
    return value


def search_text_error(value: str) -> str | None:
    """Why `value` cannot be the list's search text (`q`, and `todo-api tasks list --q`), or
    None: it searches descriptions too, so it may hold what they may (and no NUL, which
    PostgreSQL cannot take, nor a lone surrogate, which has no UTF-8)."""
    if not is_utf8(value):
        return "must be UTF-8 text"
    return control_error(value, multi_line=True)


# What `_clean_title` accepts, for the schema: whitespace around a line that starts and ends
# with neither whitespace nor a control character, holds no control character, and has a
# visible one (neither whitespace nor invisible).
TITLE_PATTERN = rf"^[{WHITESPACE}]*(?:{EDGE}{KEPT})?{SHOWN}(?:{KEPT}{EDGE})?[{WHITESPACE}]*$"

# The raw title is bounded by the same limit as the stored one, so the documented
# `maxLength` is exactly what the server enforces (a generated client can rely on it). The
# patterns only document what the validators enforce.
Title = Annotated[
    str,
    PField(
        min_length=1,
        max_length=TITLE_MAX,
        examples=["Buy milk"],
        json_schema_extra={"pattern": TITLE_PATTERN},
    ),
    AfterValidator(_clean_title),
]
Description = Annotated[
    str | None,
    PField(
        max_length=DESCRIPTION_MAX,
        description="May span lines: no control characters but tab, line feed and carriage return",
        examples=["Two litres, semi-skimmed"],
        json_schema_extra={"pattern": MULTI_LINE_PATTERN},
    ),
    AfterValidator(_multi_line),
]


def _text_only(value: Any) -> Any:
    """A JSON string only: not a number read as a Unix time."""
    if value is not None and not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time with a zone, e.g. 2026-11-24T10:00:00Z")
    return value


def _rule(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return recurrence.normalize(value)
    except recurrence.RuleError as exc:
        raise ValueError(str(exc)) from None


PriorityField = Annotated[
    Priority, PField(description="none (default), low, medium or high; sorts by this rank")
]
DueAt = Annotated[
    ClientTime | None,
    BeforeValidator(_text_only),
    PField(
        description="RFC 3339 with a UTC offset (a time without one is refused); returned in "
        "UTC. `null` clears it.",
        examples=["2026-12-24T18:00:00+01:00"],
    ),
]
RemindAt = Annotated[
    ClientTime | None,
    BeforeValidator(_text_only),
    PField(
        description="When to remind: RFC 3339 with a UTC offset, not after `due_at`; returned "
        "in UTC. At that time the service records one `reminder.fired` event. `null` clears it.",
        examples=["2026-12-24T17:00:00+01:00"],
    ),
]
Recurrence = Annotated[
    str | None,
    PField(
        max_length=recurrence.RULE_MAX,
        description=recurrence.DESCRIPTION,
        examples=recurrence.EXAMPLES,
    ),
    AfterValidator(_rule),
]


# A field named `recurrence` shadows the module inside a class body.
RuleText = Annotated[str | None, PField(description=recurrence.DESCRIPTION)]


class TaskCreate(SQLModel):
    """Body of POST. Unknown fields (id, user_id, completed, timestamps) are rejected."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    title: Title
    description: Description = None
    priority: PriorityField = Priority.none
    due_at: DueAt = None
    tags: TagNames = PField(default_factory=list)
    recurrence: Recurrence = None
    remind_at: RemindAt = None
    # The rules between fields (a recurring task needs a due_at, remind_at not after due_at)
    # live in service.tasks.rules, which checks a create and an update alike.


def _update_schema(schema: dict[str, Any]) -> None:
    """Document what `_not_null` and `_at_least_one` enforce: a field may be absent, but not
    null (unless its column is nullable), and the body names at least one field."""
    schema["minProperties"] = 1
    for name, prop in schema["properties"].items():
        if name in _NOT_NULL:
            (value,) = [branch for branch in prop.pop("anyOf") if branch.get("type") != "null"]
            prop.update(value)


class TaskUpdate(SQLModel):
    """Body of PUT: any of the fields, at least one; absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_update_schema)  # type: ignore[assignment]

    title: Title | None = None
    description: Description = None
    # Strict: a JSON boolean only, not 0, 0.0 or "yes" (the schema says boolean).
    completed: StrictBool | None = None
    priority: PriorityField | None = None
    due_at: DueAt = None
    tags: TagNames | None = None
    recurrence: Recurrence = None
    remind_at: RemindAt = None

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        """Runs only for fields the body gives, so the error names the field."""
        if value is None and info.field_name in _NOT_NULL:
            raise ValueError(f"{info.field_name} cannot be null")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> TaskUpdate:
        if not self.model_fields_set:
            raise ValueError(f"give at least one of {', '.join(type(self).model_fields)}")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set)


class TaskCompletion(SQLModel):
    """Optional body of PATCH .../complete; without it the task is toggled."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    completed: StrictBool


# A task as the API returns it, and as the audit log records it in `before`/`after`
# (`audit.schemas.TaskSnapshot` reads it back; tests/test_task_fields.py pins the two). No
# docstring: it would become the schema's description in /openapi.json.
@dataclass(frozen=True, slots=True)
class TaskPublic:
    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    priority: Priority
    due_at: Annotated[datetime | None, PField(description="In UTC")]
    tags: Annotated[tuple[str, ...], PField(description="Tag names, sorted case-insensitively")]
    recurrence: RuleText
    previous_task_id: Annotated[
        int | None,
        PField(description="In a recurring series: the task whose completion created this one"),
    ]
    next_task_id: Annotated[
        int | None,
        PField(
            description="Once a recurring task is completed: its next occurrence (null when the "
            'rule is exhausted). Also sent as `Link: <...>; rel="next-occurrence"`.'
        ),
    ]
    remind_at: Annotated[
        datetime | None,
        PField(description="In UTC; see GET /api/{user_id}/reminders for whether it fired"),
    ]


PUBLIC_FIELDS = tuple(field.name for field in fields(TaskPublic))
_PRIORITY = PUBLIC_FIELDS.index("priority")
_TAGS = PUBLIC_FIELDS.index("tags")


def etag_for(task_id: int, version: int) -> str:
    return f'"{task_id}-{version}"'


@dataclass(frozen=True, slots=True)
class TaskRecord(TaskPublic):
    """A row of `tasks` as every query returns it: the public fields, then the internal ones.

    Its fields are the table's columns (the queries select them in this order); responses are
    dumped from it as `TaskPublic`, without building a model per task.
    """

    # Bumped on every change; the ETag is derived from it.
    version: int
    # The last reminder fired (for which remind_at, when, late): see `Task`.
    reminder_fired_for: datetime | None
    reminder_fired_at: datetime | None
    reminder_late: bool

    @classmethod
    def from_row(cls, row: Any) -> TaskRecord:
        values = list(row)
        values[_PRIORITY] = Priority(values[_PRIORITY])
        values[_TAGS] = tuple(sorted_names(values[_TAGS] or ()))
        return cls(*values)

    def state(self) -> dict[str, Any]:
        """The public fields as JSON, as the audit log records them (hashed: timestamps are
        always `format_timestamp`'s fixed-width UTC)."""
        state: dict[str, Any] = {}
        for name in PUBLIC_FIELDS:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = format_timestamp(value)
            elif isinstance(value, tuple):
                value = list(value)  # the tags, sorted
            state[name] = value
        return state

    @property
    def etag(self) -> str:
        return etag_for(self.id, self.version)
