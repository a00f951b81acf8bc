"""A task's fields are declared in the table (`Task`) and the record (`TaskRecord`, whose public
part `TaskPublic` is the response and the audit snapshot); everything else derives from those.
The declarations that must stay apart are pinned to each other here, so a field added in one
place and forgotten in another fails."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi import FastAPI
from sqlalchemy.types import TypeDecorator

from audit.models import EVENTS
from audit.schemas import TaskSnapshot
from service.priority import Priority
from service.tasks import queries, rules
from service.tasks.idempotency import KEYS
from service.tasks.models import (
    PUBLIC_FIELDS,
    TASKS,
    TaskCreate,
    TaskPublic,
    TaskRecord,
    TaskUpdate,
    include_object,
)
from service.users import USERS


def _plain(annotation: Any) -> Any:
    """`Annotated[X, ...]` as X; `X | None` as (X, True) for nullable."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    annotation = _plain(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, annotation
        return _plain(args[0]), True
    return annotation, False


def test_the_record_is_the_table_row() -> None:
    """Every column, in TaskRecord's order (what the queries select), of the same type; and
    the tags, which live in task_tags (a list of names)."""
    hints = typing.get_type_hints(TaskRecord, include_extras=True)
    record = [field.name for field in fields(TaskRecord)]
    assert sorted(record) == sorted([*TASKS.c.keys(), "tags"])
    assert _plain(hints["tags"]) == tuple[str, ...]
    for column in TASKS.c:
        python_type, nullable = _split_optional(hints[column.name])
        sql_type = column.type.impl if isinstance(column.type, TypeDecorator) else column.type
        if isinstance(sql_type, sa.Enum):  # priority: the enum's values
            assert [m.value for m in python_type] == sql_type.enums, column.name
            continue
        assert python_type is sql_type.python_type, column.name
        assert nullable is column.nullable, column.name
    assert [column.name for column in queries._COLUMNS] == record
    assert [column.name for column in queries._NEW_COLUMNS] == record


def test_the_public_fields_are_the_record_less_the_internal_ones() -> None:
    assert tuple(field.name for field in fields(TaskPublic)) == PUBLIC_FIELDS
    assert [field.name for field in fields(TaskRecord)][: len(PUBLIC_FIELDS)] == list(PUBLIC_FIELDS)
    assert issubclass(TaskRecord, TaskPublic)


def test_the_audit_snapshot_has_exactly_the_public_fields() -> None:
    """`audit.schemas.TaskSnapshot` reads `before`/`after` back (history `as_of`); it must know
    every field the API shows, with the same types."""
    public = typing.get_type_hints(TaskPublic, include_extras=True)
    snapshot = typing.get_type_hints(TaskSnapshot, include_extras=True)
    assert tuple(TaskSnapshot.model_fields) == PUBLIC_FIELDS
    for name in PUBLIC_FIELDS:
        assert _split_optional(snapshot[name]) == _split_optional(public[name]), name
    assert _plain(snapshot["priority"]) is Priority


def _shape(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's schema less what only documents it (title, description, default)."""
    return {k: v for k, v in schema.items() if k not in {"title", "description", "default"}}


def test_the_openapi_snapshot_has_the_public_fields_types(app: FastAPI) -> None:
    """In /openapi.json too: each field of `TaskSnapshot` has `TaskPublic`'s type, so a
    client reads an audit event's task as it reads a response (one `Priority` enum, not a
    string beside it)."""
    schemas = app.openapi()["components"]["schemas"]
    public = schemas["TaskPublic"]["properties"]
    snapshot = schemas["TaskSnapshot"]["properties"]
    assert tuple(snapshot) == PUBLIC_FIELDS
    for name in PUBLIC_FIELDS:
        assert _shape(snapshot[name]) == _shape(public[name]), name
    assert snapshot["priority"]["$ref"] == "#/components/schemas/Priority"
    assert schemas["Priority"]["enum"] == [p.value for p in Priority]


def _record() -> TaskRecord:
    moment = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    return TaskRecord(
        id=7,
        user_id="u1",
        title="Title",
        description=None,
        completed=True,
        created_at=moment,
        updated_at=moment.replace(microsecond=5),
        priority=Priority.high,
        due_at=moment.replace(year=2027),
        tags=("a", "B"),
        recurrence="FREQ=DAILY",
        previous_task_id=6,
        next_task_id=None,
        remind_at=moment.replace(year=2027, hour=9),
        version=3,
        reminder_fired_for=None,
        reminder_fired_at=None,
        reminder_late=False,
    )


def test_the_recorded_state_is_the_public_fields_and_reads_back() -> None:
    record = _record()
    state = record.state()
    assert tuple(state) == PUBLIC_FIELDS
    # The hashed form: fixed-width UTC timestamps (never pydantic's shortened ones).
    assert state["created_at"] == "2026-11-24T10:00:00.000000Z"
    assert state["updated_at"] == "2026-11-24T10:00:00.000005Z"
    assert state["due_at"] == "2027-11-24T10:00:00.000000Z"
    assert state["remind_at"] == "2027-11-24T09:00:00.000000Z"
    # The reminder's firing state is internal: not in responses, snapshots or the ETag.
    assert not {"reminder_fired_for", "reminder_fired_at", "reminder_late"} & set(state)
    assert (state["priority"], state["tags"]) == ("high", ["a", "B"])
    snapshot = TaskSnapshot.model_validate(state)
    assert {name: getattr(snapshot, name) for name in PUBLIC_FIELDS} == {
        name: getattr(record, name) for name in PUBLIC_FIELDS
    }


def test_an_old_snapshot_reads_back_with_the_new_fields_defaults() -> None:
    """Events hashed before priorities, tags, due dates and recurrence (hash_version 1)."""
    old = {k: v for k, v in _record().state().items() if k in PUBLIC_FIELDS[:7]}
    snapshot = TaskSnapshot.model_validate(old)
    assert (snapshot.priority, snapshot.due_at, snapshot.tags, snapshot.recurrence) == (
        "none",
        None,
        (),
        None,
    )


def test_responses_show_the_public_fields_only() -> None:
    record = _record()
    shown = queries.public(record)
    assert tuple(shown) == PUBLIC_FIELDS
    assert queries.public_json(record).startswith(b'{"id":7,"user_id":"u1"')
    assert b"version" not in queries.public_list_json([record, record])


def test_what_a_client_writes_is_in_the_table() -> None:
    """Create and update bodies name public fields; the audit diff covers what an update can
    change, and the series links a completion sets."""
    assert set(TaskCreate.model_fields) <= set(TaskUpdate.model_fields) <= set(PUBLIC_FIELDS)
    assert (*TaskUpdate.model_fields, *rules.SERIES_FIELDS) == rules.DIFF_FIELDS
    for name in TaskUpdate.model_fields:
        assert name not in {"id", "user_id", "created_at", "updated_at"}


def test_the_openapi_task_is_the_public_fields(app: FastAPI) -> None:
    schemas = app.openapi()["components"]["schemas"]
    assert tuple(schemas["TaskPublic"]["properties"]) == PUBLIC_FIELDS
    assert set(schemas["TaskPublic"]["required"]) == set(PUBLIC_FIELDS)
    assert set(schemas["TaskUpdate"]["properties"]) == set(TaskUpdate.model_fields)
    assert set(schemas["TaskCreate"]["properties"]) == set(TaskCreate.model_fields)


def test_the_migrations_make_the_tables_the_models_declare(database_url: str) -> None:
    """A field added to a model without its migration fails here (as `alembic check` does)."""
    metadata = TASKS.metadata
    assert all(table.metadata is metadata for table in (USERS, EVENTS, KEYS))
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": include_object})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []
