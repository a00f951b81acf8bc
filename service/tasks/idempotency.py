"""`Idempotency-Key` on POST: a retried create returns the first response instead of a copy.

The key is claimed first, in the request's own transaction: a concurrent duplicate waits on the
key's unique index until the first request commits (then it replays the stored response) or
rolls back (then it goes ahead itself). The response is stored in the same transaction as the
task and its audit event, so a committed key always has its task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Engine, Integer, String, delete, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel

from service.exceptions import IdempotencyConflict
from service.limits import USER_ID_MAX
from service.sqltypes import JSONType, UTCDateTime, utcnow

KEY_MAX = 255
# 1 to KEY_MAX printable ASCII characters, checked (as documented) by the header's declaration.
KEY_PATTERN = r"^[\x20-\x7e]+$"
# Expired keys are deleted this many at a time, each batch its own short transaction.
PURGE_BATCH = 500


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_keys"

    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), primary_key=True))
    key: str = Field(sa_column=Column(String(KEY_MAX), primary_key=True))
    request_hash: str = Field(sa_column=Column(String(64), nullable=False))
    # Null only inside the claiming transaction, never once committed.
    status_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    response_body: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSONType, nullable=True)
    )
    # Indexed for the purge of expired keys.
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))


KEYS = IdempotencyKey.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def request_fingerprint(payload: dict[str, Any]) -> str:
    """The same body, however it was spaced or ordered, gives the same fingerprint."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _insert_claim(session: Session, user_id: str, key: str, fingerprint: str) -> bool:
    stmt = (
        insert(KEYS)
        .values(user_id=user_id, key=key, request_hash=fingerprint, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=[KEYS.c.user_id, KEYS.c.key])
        .returning(KEYS.c.key)
    )
    return session.execute(stmt).first() is not None


def claim(
    session: Session, user_id: str, key: str, fingerprint: str, retention: timedelta
) -> StoredResponse | None:
    """None if the key is now this request's; else the earlier response to replay.

    The same key with a different body is a 409. A key older than `retention`
    (IDEMPOTENCY_RETENTION_SECONDS) may be used again.
    """
    owned = (KEYS.c.user_id == user_id, KEYS.c.key == key)
    row = None
    for _ in range(3):
        if _insert_claim(session, user_id, key, fingerprint):
            return None
        row = session.execute(
            select(KEYS.c.request_hash, KEYS.c.status_code, KEYS.c.response_body, KEYS.c.created_at)
            .where(*owned)
            .with_for_update()
        ).first()
        # None: while this request waited for the row's lock, another one replaced the row
        # (it reclaimed the expired key); look again, at the new row.
        if row is not None:
            break
    if row is None:  # pragma: no cover
        raise IdempotencyConflict("This Idempotency-Key is in use by another request; retry.")
    if row.created_at < utcnow() - retention:
        session.execute(delete(KEYS).where(*owned))
        if not _insert_claim(session, user_id, key, fingerprint):  # pragma: no cover
            raise IdempotencyConflict("This Idempotency-Key is in use by another request; retry.")
        return None
    if row.request_hash != fingerprint:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request body."
        )
    if row.status_code is None or row.response_body is None:  # pragma: no cover
        raise IdempotencyConflict("This Idempotency-Key is in use by another request; retry.")
    return StoredResponse(status_code=row.status_code, body=row.response_body)


def store_response(
    session: Session, user_id: str, key: str, status_code: int, body: dict[str, Any]
) -> None:
    session.execute(
        update(KEYS)
        .where(KEYS.c.user_id == user_id, KEYS.c.key == key)
        .values(status_code=status_code, response_body=body)
    )


_PURGE = text(
    """
    DELETE FROM idempotency_keys
    WHERE (user_id, key) IN (
        SELECT user_id, key FROM idempotency_keys
        WHERE created_at < :cutoff
        ORDER BY created_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    """
)


def purge_expired(
    engine: Engine, retention: timedelta, *, batch_size: int = PURGE_BATCH, max_batches: int = 100
) -> int:
    """Delete keys older than `retention`, `batch_size` rows per transaction, so no lock is held
    for long and a key being claimed or reclaimed right now is skipped, not waited for.
    Several instances may purge at once. Returns how many were deleted."""
    deleted = 0
    cutoff = utcnow() - retention
    for _ in range(max_batches):
        with engine.begin() as conn:
            count = conn.execute(_PURGE, {"cutoff": cutoff, "batch": batch_size}).rowcount
        deleted += count
        if count < batch_size:
            break
    return deleted
