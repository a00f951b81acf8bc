"""The audit tables: the events, each user's chain head, the checkpoints and the verify
endpoint's last verified points."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Identity,
    Index,
    SmallInteger,
    String,
    text,
)
from sqlmodel import Field, SQLModel

from service.limits import REQUEST_ID_MAX, USER_ID_MAX
from service.sqltypes import ID_TYPE, JSONType, ReadableUTCDateTime, UTCDateTime

# Longer User-Agent headers are cut to this length before they are recorded.
USER_AGENT_MAX = 256
SEQ_CHECK = "ck_audit_events_seq_from_1"


class AuditEvent(SQLModel, table=True):
    """One recorded change. Append-only: the database rejects UPDATE, DELETE and TRUNCATE.

    No foreign key to `tasks`, so a deleted task keeps its history.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        # The chain: gapless per user, and a fork fails loudly. Also the user's feed by seq.
        Index("uq_audit_events_user_seq", "user_id", "seq", unique=True),
        # One entity's timeline.
        Index("ix_audit_events_entity", "user_id", "entity_type", "entity_id", "seq"),
        Index("ix_audit_events_user_occurred", "user_id", "occurred_at"),
        Index("ix_audit_events_request_id", "request_id"),
        Index("ix_audit_events_trace_id", "trace_id"),
        # Chains start at 1: the incremental verify reads on from the last verified seq, so a
        # row inserted below the start would never be read by it (migration 0015).
        CheckConstraint("seq >= 1", name=SEQ_CHECK),
    )

    id: int | None = Field(
        default=None, sa_column=Column(ID_TYPE, Identity(always=False), primary_key=True)
    )
    occurred_at: datetime = Field(
        sa_column=Column(
            ReadableUTCDateTime, nullable=False, server_default=text("CURRENT_TIMESTAMP")
        )
    )
    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), nullable=False))
    actor_id: str = Field(sa_column=Column(String(USER_ID_MAX), nullable=False))
    action: str = Field(sa_column=Column(String(32), nullable=False))
    entity_type: str = Field(sa_column=Column(String(32), nullable=False))
    entity_id: str = Field(sa_column=Column(String(64), nullable=False))
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType, nullable=True))
    changes: dict[str, Any] = Field(sa_column=Column(JSONType, nullable=False))
    request_id: str | None = Field(
        default=None, sa_column=Column(String(REQUEST_ID_MAX), nullable=True)
    )
    trace_id: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    span_id: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    client_ip: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    user_agent: str | None = Field(
        default=None, sa_column=Column(String(USER_AGENT_MAX), nullable=True)
    )
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash_version: int = Field(sa_column=Column(SmallInteger, nullable=False))
    # The seq (same chain) of the event that caused this one, e.g. the completion that
    # created a recurring task's next occurrence. Hashed from hash_version 2 on.
    caused_by_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # The writing transaction (txid_current() on PostgreSQL): lets the completeness guard
    # check that a task change and its event committed together.
    xact_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class AuditChainHead(SQLModel, table=True):
    """The newest (seq, hash) of a user's chain; its row lock serializes appends."""

    __tablename__ = "audit_chain_heads"

    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), primary_key=True))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


class AuditCheckpoint(SQLModel, table=True):
    """A signed commitment to every chain head at one moment (see `audit.checkpoint`).

    Append-only like the events. The copy that counts is the one kept outside the database;
    this one serves proofs and links each checkpoint to the previous root.
    """

    __tablename__ = "audit_checkpoints"
    __table_args__ = (
        # The periodic maker's interval: at most one checkpoint per interval, across instances.
        Index("uq_audit_checkpoints_interval", "interval_start", unique=True),
    )

    id: int | None = Field(
        default=None, sa_column=Column(ID_TYPE, Identity(always=False), primary_key=True)
    )
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    interval_start: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    tree_size: int = Field(sa_column=Column(BigInteger, nullable=False))
    root_hash: str = Field(sa_column=Column(String(64), nullable=False))
    previous_root_hash: str | None = Field(
        default=None, sa_column=Column(String(64), nullable=True)
    )
    key_id: str = Field(sa_column=Column(String(64), nullable=False))
    signature: str = Field(sa_column=Column(String(128), nullable=False))
    # [[user_id, head seq, head hash], ...] in user-id order: the tree's leaves.
    leaves: list[Any] = Field(sa_column=Column(JSONType, nullable=False))


class AuditVerifiedHead(SQLModel, table=True):
    """The last point up to which the verify endpoint found a user's chain intact (see
    `audit.verified`); every later check, full or not, holds the chain to it. seq 0: none yet.
    `failed_at`: a verification has failed since the last one that passed."""

    __tablename__ = "audit_verified_heads"

    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), primary_key=True))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    verified_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    failed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


EVENTS = AuditEvent.__table__  # type: ignore[attr-defined]
HEADS = AuditChainHead.__table__  # type: ignore[attr-defined]
CHECKPOINTS = AuditCheckpoint.__table__  # type: ignore[attr-defined]
VERIFIED = AuditVerifiedHead.__table__  # type: ignore[attr-defined]
