"""What the audit endpoints return.

Times are RFC 3339 in UTC at microsecond precision (`2026-11-24T10:00:00.123456Z`): the exact
text the hash chain covers, so a client can recompute an event's hash from its JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializeAsAny,
    SkipValidation,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic.json_schema import SkipJsonSchema

from audit.chain import format_timestamp
from service.priority import Priority

UtcTimestamp = Annotated[
    datetime,
    PlainSerializer(format_timestamp, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def to_utc(value: datetime) -> datetime:
    """In UTC; a time that has no UTC equivalent (year 1 or 9999 near the edge) is refused."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


# RFC 3339 `date-time` (what the OpenAPI `format: date-time` promises), with a zone.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# An offset whose `+` a URL's query string turned into a space (`10:00:00 01:00`).
_PLUS_AS_SPACE = re.compile(r"(.*) (\d{2}:\d{2})")


def rfc3339_text(value: Any) -> Any:
    """Only RFC 3339 text: pydantic alone would also read `-0.5` or `1700000000` as a Unix time."""
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        message = "must be an RFC 3339 date-time with a zone, e.g. 2026-11-24T10:00:00Z"
        plus = _PLUS_AS_SPACE.fullmatch(value)
        if plus is not None and _RFC3339.fullmatch(f"{plus[1]}+{plus[2]}"):
            # The person wrote a zone: say where it went.
            message += "; a `+` in a URL's query is read as a space: write it as %2B"
        raise ValueError(message)
    return value


# A time given by a client: with a zone (naive times are refused, not guessed), then in UTC.
# Digits after the sixth of the seconds' fraction are cut: stored times are microseconds.
ClientTime = Annotated[AwareDatetime, BeforeValidator(rfc3339_text), AfterValidator(to_utc)]

# RFC 3339 writes the fraction after "."; ISO 8601 (and fromisoformat, which the CLI uses)
# also after ",".
_FINER_THAN_MICROSECONDS = re.compile(r"[.,]\d{6}\d*[1-9]")


def round_up_to_microsecond(text: str, parsed: datetime) -> datetime:
    """`parsed` (`text` cut to the microsecond), one microsecond later if a digit cut was not 0.

    Times are kept to the microsecond, so a bound compared with `>=` or `<` (`since`, `until`,
    `due_before`) selects the same times rounded up as exact; cut, a `since` of 21.4200075
    let in an event of 21.420007. A bound compared with `>` or `<=` (`due_after`, `as_of`)
    is exact when cut, as ClientTime leaves it.
    """
    if _FINER_THAN_MICROSECONDS.search(text) is None:
        return parsed
    try:
        return parsed + timedelta(microseconds=1)
    except OverflowError:
        raise ValueError("is out of range once rounded up to the microsecond") from None


def _rounded_up(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime:
    parsed: datetime = handler(value)
    return round_up_to_microsecond(value, parsed) if isinstance(value, str) else parsed


# A client's time used as a bound compared with `>=` or `<` (see round_up_to_microsecond).
ClientTimeRoundedUp = Annotated[ClientTime, WrapValidator(_rounded_up)]


class AuditAction(StrEnum):
    created = "task.created"
    updated = "task.updated"
    completed = "task.completed"
    reopened = "task.reopened"
    deleted = "task.deleted"
    # Written by the service (its own actor id) when a task's `remind_at` passes.
    reminder_fired = "reminder.fired"


def trace_url(base: str | None, trace_id: str | None) -> str | None:
    """`{JAEGER_UI_URL}/trace/{trace_id}`, when both are known."""
    if not base or not trace_id:
        return None
    return f"{base.rstrip('/')}/trace/{trace_id}"


class TaskSnapshot(BaseModel):
    """A task's state as an audit event recorded it. Events written before a field existed
    show its default (priority `none`, no due date, no tags, no rule).

    Declared here, apart from the task package (audit does not import it), because it reads
    what hashed events hold; tests/test_task_fields.py pins it to `TaskPublic`.
    """

    model_config = ConfigDict(extra="ignore")

    id: int
    user_id: str
    title: str
    description: str | None
    completed: bool
    created_at: UtcTimestamp
    updated_at: UtcTimestamp
    priority: Priority = Priority.none
    due_at: UtcTimestamp | None = None
    tags: tuple[str, ...] = ()
    recurrence: str | None = None
    previous_task_id: int | None = None
    next_task_id: int | None = None
    remind_at: UtcTimestamp | None = None

    @classmethod
    def of_event(cls, after: Any) -> TaskSnapshot | Any:
        """An event's `after`, with the defaults of fields added since it was written; or,
        altered by hand out of this shape, as recorded (verifying reports the event)."""
        try:
            return cls.model_validate(after)
        except ValidationError:
            return after


class FiredReminder(BaseModel):
    """Which reminder a `reminder.fired` event fired (service.reminders writes it)."""

    remind_at: UtcTimestamp = Field(description="The task's `remind_at` that fired")
    late: bool = Field(
        description="Fired more than REMINDER_GRACE_SECONDS after `remind_at` (the service "
        "was down then, or it was set in the past)"
    )


class TaskEventState(TaskSnapshot):
    """An audit event's `before`/`after`: the task, and on a `reminder.fired` event's `after`
    the reminder that fired (absent elsewhere, never null)."""

    reminder: FiredReminder | SkipJsonSchema[None] = None


# Served as recorded (the JSON the hash covers, also fields a newer writer added), not
# validated nor re-serialized: the model documents the shape, the value stays the stored dict.
TaskState = SerializeAsAny[SkipValidation[TaskEventState]]


class AuditEventPublic(BaseModel):
    """One audit event: every stored column except `xact_id` (a PostgreSQL transaction
    number, meaningful only inside the database)."""

    id: int
    seq: int = Field(description="Position in the user's hash chain: 1, 2, 3, ... without gaps")
    occurred_at: UtcTimestamp = Field(description="Database clock when the change was recorded")
    user_id: str
    actor_id: str
    # Documented as the enum; read as stored, so an action a newer writer added still shows.
    action: Annotated[
        str, WithJsonSchema({"type": "string", "enum": [a.value for a in AuditAction]})
    ]
    entity_type: str
    entity_id: str
    before: TaskState | None = Field(description="Full task state; null on create")
    after: TaskState | None = Field(
        description="Full task state; null on delete. On `reminder.fired`, also `reminder`"
    )
    # As recorded too: an event altered by hand must still be served (verify reports it).
    changes: SerializeAsAny[SkipValidation[dict[str, Any]]] = Field(
        description="`{field: [old, new]}`"
    )
    request_id: str | None
    trace_id: str | None
    span_id: str | None
    client_ip: str | None
    user_agent: str | None
    prev_hash: str
    hash: str = Field(description="SHA-256 (hex) of the canonical encoding of the event")
    hash_version: int = Field(
        description="Which field list and encoding the hash covers: 1 for events written "
        "before `caused_by_seq` existed, 2 since, 3 once PostgreSQL computes the hash (jsonb "
        "text encoding; see the README's Audit trail)"
    )
    caused_by_seq: int | None = Field(
        default=None,
        description="The seq of the event that caused this one: on a recurring task's next "
        "occurrence, its `task.created` names the completion that created it",
    )
    trace_url: str | None = Field(
        default=None, description="Link to the trace in Jaeger, when JAEGER_UI_URL is set"
    )

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], jaeger_ui_url: str | None = None) -> AuditEventPublic:
        return cls.model_validate(
            {
                **{name: row[name] for name in cls.model_fields if name != "trace_url"},
                "trace_url": trace_url(jaeger_ui_url, row["trace_id"]),
            }
        )


class AuditPage(BaseModel):
    """Newest first. Pass `next_cursor` back as `cursor` for the next page; null at the end."""

    items: list[AuditEventPublic]
    next_cursor: str | None


class VerifyReport(BaseModel):
    """The outcome of recomputing a chain.

    `head_seq`/`head_hash` are the chain head as the database records it (0 and null for a user
    without events); `events` counts the events checked, up to the first bad one.
    `verified_from_seq` is 0 for a check from seq 1, else the last verified seq the check
    continued from (the events up to it were verified by an earlier call).
    """

    ok: bool
    events: int
    head_seq: int
    head_hash: str | None
    first_bad_seq: int | None
    reason: str | None
    verified_from_seq: int = 0


class TaskHistory(BaseModel):
    """Every event of one task, oldest first, also after the task was deleted."""

    task_id: int
    items: list[AuditEventPublic]
    next_cursor: str | None


class TaskAsOf(BaseModel):
    """The task as it was at `as_of`: the state after its last event at or before that time."""

    task_id: int
    as_of: UtcTimestamp
    task: SerializeAsAny[SkipValidation[TaskSnapshot]]
    event_seq: int = Field(description="The chain seq of the event that produced this state")
    event_occurred_at: UtcTimestamp


class SignedCheckpoint(BaseModel):
    """A checkpoint's signed statement and signature, without its leaves (see
    `audit/checkpoint.py` for how the statement is built from these fields)."""

    format: str
    created_at: str
    tree_size: int
    root_hash: str
    previous_root_hash: str | None
    key_id: str = Field(description="Which public key (at /.well-known/audit-keys.json) signed")
    signature: str = Field(description="Ed25519 signature, base64")


class AuditProof(BaseModel):
    """The caller's chain head at the latest checkpoint and its RFC 9162 inclusion path.

    Verify it with `audit.proof.verify_proof` (or by hand: see the README): the signature with
    the public key, the path from the leaf to the signed root, and the caller's own events up
    to `seq`.
    """

    format: str
    user_id: str
    seq: int = Field(description="The caller's head seq when the checkpoint was made")
    hash: str = Field(description="The hash of the event at that seq")
    leaf_index: int
    inclusion_path: list[str] = Field(description="Sibling hashes, nearest first, hex")
    checkpoint: SignedCheckpoint


class PublicJwk(BaseModel):
    kty: str
    crv: str
    x: str
    kid: str
    alg: str


class AuditKeys(BaseModel):
    """The public keys that verify audit checkpoints, as an RFC 7517 JWK set."""

    keys: list[PublicJwk]
