"""The tag tables' queries. Nothing here commits; writes run in the caller's unit of work.

A tag is found by PostgreSQL's `lower(name)`, the unique index `uq_tags_user_name`'s key, so
`Work` and `work` are one tag and the first spelling stays. The key is never computed in
Python: `str.lower()` differs from PostgreSQL's for some names (a final 'Σ', a dotted 'İ').

Locks, in one order per user (README, "Locks"): the user's tag lock (`holding_tag_lock`),
then tag rows, then task rows, then the chain head. Every write that uses tags holds the tag
lock shared and reads its tags `FOR KEY SHARE`; a rename or deletion of a tag holds it alone,
then locks the tag. So a tag's row lock is never wanted while its holder waits for the tag
lock, and a `FOR KEY SHARE` never waits at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Text,
    and_,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.exceptions import NotFound, TagConflict
from service.sqltypes import utcnow
from service.tags.models import UNIQUE_NAME_INDEX, Tag, TaskTag
from service.tags.rules import TAGS_PER_USER_MAX, unique_names

TAGS = Tag.__table__  # type: ignore[attr-defined]
TASK_TAGS = TaskTag.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TagRecord:
    id: int
    name: str
    task_count: int
    created_at: datetime


_WANTED = (
    func.unnest(bindparam("names", type_=ARRAY(Text)))
    .table_valued("name")
    .render_derived(name="wanted")
)
# The owner's tag a wanted name names, if any (at most one: the unique index's key).
_NAMED = and_(
    TAGS.c.user_id == bindparam("owner"), func.lower(TAGS.c.name) == func.lower(_WANTED.c.name)
)
_NAMED_IDS = select(TAGS.c.id).select_from(_WANTED.outerjoin(TAGS, _NAMED))  # NULL: no tag
_NAMED_TAGS = select(_WANTED.c.name.label("wanted"), TAGS.c.id, TAGS.c.name).join_from(
    _WANTED, TAGS, _NAMED
)
# advisory lock key (class, per-user key): the user's tag lock.
_TAG_LOCK = (0x74616775, func.hashtext(bindparam("owner")))  # "tagu"


def holding_tag_lock(*, alone: bool = False) -> ColumnElement[bool]:
    """A condition that takes the user's tag lock (`owner`), held until commit: shared, or
    `alone`. Without columns, it is a One-Time Filter, evaluated before the statement reads
    or locks any row, so the tag lock comes first without a round trip of its own. The rows
    are read with the snapshot taken before a wait for it; those changed meanwhile are read
    again as they are now (a row lock's recheck), those made meanwhile are not seen."""
    take = func.pg_advisory_xact_lock if alone else func.pg_advisory_xact_lock_shared
    return select(take(*_TAG_LOCK)).scalar_subquery().is_not(None)


_BY_NAMES = _NAMED_TAGS.where(holding_tag_lock()).with_for_update(
    of=TAGS, read=True, key_share=True
)
_INSERT = (
    pg_insert(TAGS)
    .values(user_id=bindparam("owner"), name=bindparam("name"), created_at=bindparam("now"))
    .on_conflict_do_nothing(index_elements=[TAGS.c.user_id, text("lower(name)")])
    .returning(TAGS.c.id)
)
_COUNT = select(func.count()).select_from(TAGS).where(TAGS.c.user_id == bindparam("owner"))
# Creators of one user's tags take turns (until commit), so that the count each one checks
# against TAGS_PER_USER_MAX includes the others' new tags, and no insert waits for another's
# uncommitted name. Only a write that creates tags takes it, holding the tag lock shared.
_CREATORS_TAKE_TURNS = select(
    func.pg_advisory_xact_lock(0x74616773, func.hashtext(bindparam("owner")))  # "tags"
)
_USAGE = (
    select(func.count())
    .select_from(TASK_TAGS)
    .where(TASK_TAGS.c.tag_id == TAGS.c.id)
    .scalar_subquery()
    .label("task_count")
)
_LIST = (
    select(TAGS.c.id, TAGS.c.name, _USAGE, TAGS.c.created_at)
    .where(TAGS.c.user_id == bindparam("owner"))
    .order_by(func.lower(TAGS.c.name), TAGS.c.name, TAGS.c.id)
)
_ONE = select(TAGS.c.id, TAGS.c.name, _USAGE, TAGS.c.created_at).where(
    TAGS.c.user_id == bindparam("owner"), TAGS.c.id == bindparam("tag_id")
)
# The owner's tag: every statement on one tag names its owner too, the writes as well (they
# run after `lock_tag`, which checked it, but one called without it still finds no row).
_OWNED_TAG = and_(TAGS.c.user_id == bindparam("owner"), TAGS.c.id == bindparam("tag_id"))
_LOCK = (
    select(TAGS.c.id, TAGS.c.name).where(holding_tag_lock(alone=True), _OWNED_TAG).with_for_update()
)
_TAGGED = (
    select(TASK_TAGS.c.task_id)
    .where(TASK_TAGS.c.user_id == bindparam("owner"), TASK_TAGS.c.tag_id == bindparam("tag_id"))
    .order_by(TASK_TAGS.c.task_id)
)
_RENAME = update(TAGS).where(_OWNED_TAG).values(name=bindparam("new_name"))
_REMOVE = delete(TAGS).where(_OWNED_TAG)
# A task's links but to these tags.
_UNLINK_OTHERS = delete(TASK_TAGS).where(
    TASK_TAGS.c.user_id == bindparam("owner"),
    TASK_TAGS.c.task_id == bindparam("task_id"),
    TASK_TAGS.c.tag_id.not_in(bindparam("tag_ids", expanding=True)),
)


def _existing(session: Session, user_id: str, names: list[str]) -> dict[str, tuple[int, str]]:
    """Each of these names that names a tag, with the tag's (id, stored name)."""
    rows = session.execute(_BY_NAMES, {"owner": user_id, "names": names}).all()
    return {str(row.wanted): (int(row.id), str(row.name)) for row in rows}


def tag_ids_named(
    session: Session | Connection, user_id: str, names: Sequence[str]
) -> list[int] | None:
    """The distinct ids of the user's tags of these names; None if one names no tag."""
    ids = session.execute(_NAMED_IDS, {"owner": user_id, "names": list(names)}).scalars().all()
    if None in ids:
        return None
    return sorted({int(i) for i in ids})


def resolve(session: Session, user_id: str, names: list[str]) -> list[tuple[int, str]]:
    """(id, name) of each named tag, creating the unknown ones; the stored spelling wins."""
    return _resolve(session, user_id, names)[0]


def _resolve(
    session: Session, user_id: str, names: list[str]
) -> tuple[list[tuple[int, str]], set[int]]:
    """`resolve`, and the ids of the tags this call inserted: a name that a concurrent
    transaction inserted first (the insert waited for it, then did nothing) is not among them.

    Holds the user's tag lock shared from its first statement on (`_BY_NAMES`)."""
    wanted = unique_names(names)
    if not wanted:
        return [], set()
    inserted: set[int] = set()
    for _ in range(3):  # what this round inserted is found on the next
        found = _existing(session, user_id, wanted)
        missing = [name for name in wanted if name not in found]
        if not missing:
            # Two names PostgreSQL folds together ('ΟΔΟΣ', 'οδοσ') are one tag, listed once.
            return list(dict.fromkeys(found[name] for name in wanted)), inserted
        session.execute(_CREATORS_TAKE_TURNS, {"owner": user_id})
        # What the one before in the queue created (or a rename committed while the first
        # lookup waited for the tag lock) is no longer missing.
        found = _existing(session, user_id, wanted)
        missing = [name for name in wanted if name not in found]
        if not missing:
            return list(dict.fromkeys(found[name] for name in wanted)), inserted
        now = utcnow()
        rows = [{"owner": user_id, "name": name, "now": now} for name in missing]
        inserted.update(session.scalars(_INSERT, rows))
        # Counted once inserted: two missing names PostgreSQL folds together ('New', 'new')
        # made one tag (the second did nothing). Past the limit, the caller rolls them back.
        if session.execute(_COUNT, {"owner": user_id}).scalar_one() > TAGS_PER_USER_MAX:
            raise TagConflict(
                f"A user has at most {TAGS_PER_USER_MAX} tags; delete unused tags first."
            )
    raise TagConflict("The tags changed concurrently; try again.")


def set_links(
    session: Session, user_id: str, task_id: int, tag_ids: list[int], *, new: bool = False
) -> None:
    """Make the task's tags exactly these (a new task has none to remove)."""
    if not new:
        session.execute(
            _UNLINK_OTHERS, {"owner": user_id, "task_id": task_id, "tag_ids": list(tag_ids)}
        )
    if tag_ids:
        session.execute(
            pg_insert(TASK_TAGS)
            .values([{"task_id": task_id, "tag_id": i, "user_id": user_id} for i in tag_ids])
            .on_conflict_do_nothing()
        )


def _record(row: Any) -> TagRecord:
    return TagRecord(int(row.id), str(row.name), int(row.task_count), row.created_at)


def list_tags(session: Session, user_id: str) -> list[TagRecord]:
    return [_record(row) for row in session.execute(_LIST, {"owner": user_id})]


def get_tag(session: Session, user_id: str, tag_id: int) -> TagRecord:
    row = session.execute(_ONE, {"owner": user_id, "tag_id": tag_id}).first()
    if row is None:
        raise NotFound(f"Tag {tag_id} not found.")
    return _record(row)


def create_tag(session: Session, user_id: str, name: str) -> tuple[TagRecord, bool]:
    """The tag of that name, and whether this call created it (an existing one is kept)."""
    ((tag_id, _),), inserted = _resolve(session, user_id, [name])
    return get_tag(session, user_id, tag_id), tag_id in inserted


def lock_tag(session: Session, user_id: str, tag_id: int) -> tuple[int, str]:
    """The tag under a row lock, after the user's tag lock, alone: no other write that uses
    or changes the user's tags runs until the caller commits."""
    row = session.execute(_LOCK, {"owner": user_id, "tag_id": tag_id}).first()
    if row is None:
        raise NotFound(f"Tag {tag_id} not found.")
    return int(row.id), str(row.name)


def tagged_task_ids(session: Session, user_id: str, tag_id: int) -> list[int]:
    """The ids of the user's tasks carrying the user's tag, in id order."""
    params = {"owner": user_id, "tag_id": tag_id}
    return [int(i) for i in session.execute(_TAGGED, params).scalars()]


def check_name_free(session: Session, user_id: str, tag_id: int, name: str) -> None:
    """409 if another of the user's tags has this name, read without a lock: a rename checks
    it before it locks anything, so a clash is answered without waiting for anything."""
    row = session.execute(_NAMED_TAGS, {"owner": user_id, "names": [name]}).first()
    if row is not None and int(row.id) != tag_id:
        raise TagConflict(f"Another tag is already named {row.name!r} (names ignore case).")


def rename(session: Session, user_id: str, tag_id: int, name: str) -> None:
    try:
        session.execute(_RENAME, {"owner": user_id, "tag_id": tag_id, "new_name": name})
    except IntegrityError as exc:
        # A concurrent rename or create took the name first: the unique index is the last word.
        if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != UNIQUE_NAME_INDEX:
            raise
        raise TagConflict(
            f"Another tag already has the name {name!r} (names ignore case)."
        ) from None


def remove(session: Session, user_id: str, tag_id: int) -> None:
    """Delete the user's tag; its links to tasks go with it (ON DELETE CASCADE)."""
    session.execute(_REMOVE, {"owner": user_id, "tag_id": tag_id})
