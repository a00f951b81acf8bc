"""A task's fields: the `tasks` table, the request bodies, and the record every query returns
(whose public part is the response body and the audit log's snapshot).

To add a field, see "Where to add a new task field" in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, StrictBool, model_validator
from pydantic import Field as PField
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlmodel import Field, SQLModel

from audit.chain import format_timestamp
from service.limits import USER_ID_MAX
from service.sqltypes import ID_TYPE, UTCDateTime

TITLE_MAX = 200
DESCRIPTION_MAX = 1000


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
    # Bumped on every change; the ETag is derived from it.
    version: int = Field(
        default=1, sa_column=Column(Integer, nullable=False, server_default=text("1"))
    )


TASKS = Task.__table__  # type: ignore[attr-defined]
# Columns a client may not set to null (absent is fine in an update).
_NOT_NULL = frozenset(column.name for column in TASKS.c if not column.nullable)


# --- API models ------------------------------------------------------------


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _clean_title(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    if len(value) > TITLE_MAX:
        raise ValueError(f"must be at most {TITLE_MAX} characters")
    return value


# What str.strip() removes, for the documented pattern of a title (not blank, no NUL).
_WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TITLE_PATTERN = rf"^[^\x00]*[^\x00{_WHITESPACE}][^\x00]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"

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
    AfterValidator(_no_nul),
    AfterValidator(_clean_title),
]
Description = Annotated[
    str | None,
    PField(
        max_length=DESCRIPTION_MAX,
        examples=["Two litres, semi-skimmed"],
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    ),
    AfterValidator(_no_nul),
]


class TaskCreate(SQLModel):
    """Body of POST. Unknown fields (id, user_id, completed, timestamps) are rejected."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    title: Title
    description: Description = None


def _update_schema(schema: dict[str, Any]) -> None:
    """Document what `_at_least_one` enforces: a field may be absent, but not null (unless its
    column is nullable), and the body names at least one field."""
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

    @model_validator(mode="after")
    def _at_least_one(self) -> TaskUpdate:
        if not self.model_fields_set:
            raise ValueError(f"give at least one of {', '.join(type(self).model_fields)}")
        for name in type(self).model_fields:
            if name in self.model_fields_set and name in _NOT_NULL and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
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


PUBLIC_FIELDS = tuple(field.name for field in fields(TaskPublic))


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

    @classmethod
    def from_row(cls, row: Any) -> TaskRecord:
        return cls(*row)

    def state(self) -> dict[str, Any]:
        """The public fields as JSON, as the audit log records them (hashed: timestamps are
        always `format_timestamp`'s fixed-width UTC)."""
        state: dict[str, Any] = {}
        for name in PUBLIC_FIELDS:
            value = getattr(self, name)
            state[name] = format_timestamp(value) if isinstance(value, datetime) else value
        return state

    @property
    def etag(self) -> str:
        return etag_for(self.id, self.version)
