"""The one statement that appends an event to a user's chain, with the change it records.

It locks the user's chain head, takes the next seq and the previous hash, computes the event's
hash in PostgreSQL (`audit.chain`, hash version 3), inserts the event and moves the head,
optionally together with the change (a task's INSERT, UPDATE or DELETE): the head's lock is held
for one round trip plus the commit. Built once per kind of change, in SQLAlchemy's expression
language; `audit.recorder` runs it. Light on imports: the CLI loads it through the task queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Select,
    String,
    bindparam,
    cast,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.dml import ReturningDelete, ReturningInsert, ReturningUpdate

from audit.chain import HASH_VERSION, HASHED_FIELDS
from audit.models import EVENTS, HEADS
from service.sqltypes import UTCDateTime

ReturningChange = ReturningInsert[Any] | ReturningUpdate[Any] | ReturningDelete[Any]
# Builds the change from the locked head (a CTE of at most one row): the change must happen
# only if the head exists (`FROM head`, or `head_exists`), so that a missing head changes
# nothing and the statement can be run again once the head is made.
ChangeBuilder = Callable[[CTE], ReturningChange]
# Further writes that need the change's row (e.g. a new task's tag links).
DependentBuilder = Callable[[CTE], Any]

# The event's values the caller gives, each a bound parameter `ev_<name>`; the chain's (seq,
# prev_hash, occurred_at, hash) come from the head inside the statement.
_GIVEN = (
    "user_id",
    "actor_id",
    "action",
    "entity_type",
    "entity_id",
    "before",
    "after",
    "changes",
    "request_id",
    "trace_id",
    "span_id",
    "client_ip",
    "user_agent",
    "caused_by_seq",
)
# Every column an append writes (then `xact_id`, the writing transaction).
EVENT_COLUMNS = (*HASHED_FIELDS[HASH_VERSION], "hash", "hash_version")
_JSON_FIELDS = frozenset({"before", "after", "changes"})
# RFC 3339 UTC at microsecond precision: `audit.chain.format_timestamp`'s text.
TIMESTAMP_SQL_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def head_exists(head: CTE) -> ColumnElement[bool]:
    """A change's condition: the chain head is there (and locked)."""
    return select(head.c.seq).exists()


def _given(name: str) -> ColumnElement[Any]:
    """A caller-given value, typed so that jsonb_build_object makes JSON of the right kind."""
    column_type = EVENTS.c[name].type
    param = bindparam(f"ev_{name}", type_=column_type)
    return cast(param, JSONB if name in _JSON_FIELDS else column_type)


def build_append(
    change: ChangeBuilder | None = None,
    *,
    new_entity: bool = False,
    dependents: Sequence[DependentBuilder] = (),
) -> Select[Any]:
    """The one statement that appends an event (and makes `change`, if given).

    With `new_entity`, the change inserts the entity: its `id` becomes the event's entity id
    and the `id` of its `after` state. The statement returns the change's RETURNING columns
    (if any), then `event_id`, `event_seq` and `event_hash`; no row if the head is missing.
    """
    head = (
        select(HEADS.c.seq, HEADS.c.hash)
        .where(HEADS.c.user_id == bindparam("ev_user_id", type_=HEADS.c.user_id.type))
        .with_for_update()
        .cte("head")
    )
    values: dict[str, ColumnElement[Any]] = {name: _given(name) for name in _GIVEN}
    source: Any = head
    changed: CTE | None = None
    if change is not None:
        changed = change(head).cte("change")
        source = head.join(changed, true())  # one row each
        if new_entity:
            values["entity_id"] = cast(changed.c.id, String)
            values["after"] = values["after"].op("||")(
                func.jsonb_build_object(literal("id"), changed.c.id)
            )
    # Materialized once (read twice below): one clock reading, taken after the head's lock.
    event = (
        select(
            *(value.label(name) for name, value in values.items()),
            (head.c.seq + 1).label("seq"),
            head.c.hash.label("prev_hash"),
            func.clock_timestamp(type_=UTCDateTime).label("occurred_at"),
        )
        .select_from(source)
        .cte("event")
    )
    hashed_as_text: dict[str, ColumnElement[Any]] = {
        name: event.c[name] for name in HASHED_FIELDS[HASH_VERSION]
    }
    hashed_as_text["occurred_at"] = func.to_char(
        func.timezone(literal("UTC"), event.c.occurred_at), literal(TIMESTAMP_SQL_FORMAT)
    )
    body = func.jsonb_build_object(
        *(part for name, value in hashed_as_text.items() for part in (literal(name), value)),
        literal("hash_version"),
        literal(HASH_VERSION),
    )
    digest = func.encode(
        func.sha256(func.convert_to(cast(body, String), literal("UTF8"))), literal("hex")
    )
    signed = select(event, digest.label("hash")).cte("signed")
    appended = (
        insert(EVENTS)
        .from_select(
            [*EVENT_COLUMNS, "xact_id"],
            select(
                *(signed.c[name] for name in EVENT_COLUMNS if name != "hash_version"),
                literal(HASH_VERSION),
                func.txid_current(),
            ),
        )
        .returning(EVENTS.c.id, EVENTS.c.seq, EVENTS.c.hash)
        .cte("appended")
    )
    # The head row is locked above (FOR UPDATE) and written once, here.
    moved = (
        update(HEADS)
        .where(HEADS.c.user_id == signed.c.user_id)
        .values(seq=signed.c.seq, hash=signed.c.hash)
    ).cte("moved")
    returned: list[Any] = list(changed.c) if changed is not None else []
    statement = select(
        *returned,
        appended.c.id.label("event_id"),
        appended.c.seq.label("event_seq"),
        appended.c.hash.label("event_hash"),
    ).select_from(appended if changed is None else appended.join(changed, true()))
    statement = statement.add_cte(moved)
    for dependent in dependents:
        assert changed is not None, "dependent writes need a change"
        statement = statement.add_cte(dependent(changed).cte())
    return statement
