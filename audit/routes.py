"""The audit endpoints: the caller's feed, chain verification, proof and a task's history;
and the public keys that verify checkpoints, at a well-known path.

Thin: queries in `audit.queries`, verification in `audit.verify`. The `{user_id}` must be the
token's user (CurrentUser), and every query filters by it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from audit import queries
from audit.proof import LatestProofs
from audit.schemas import (
    AuditAction,
    AuditEventPublic,
    AuditKeys,
    AuditPage,
    AuditProof,
    ClientTime,
    ClientTimeRoundedUp,
    TaskAsOf,
    TaskHistory,
    TaskSnapshot,
    VerifyReport,
)
from audit.verified import verify_and_record
from audit.verify import ChainReport
from observability import metrics
from service.deps import (
    CurrentUser,
    PlainDigits,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    TaskIdPath,
    UnitOfWorkRoute,
    UserIdPath,
)
from service.exceptions import InvalidInput, NotFound
from service.limits import BIGINT_MAX, PAGE_SIZE_MAX, REQUEST_ID_MAX
from service.openapi import error_responses
from service.ratelimit import expensive_operation
from service.responses import json_response
from service.routing import Router, get_only

log = logging.getLogger("audit.verify")

router = Router(prefix="/api/{user_id}", tags=["audit"], route_class=UnitOfWorkRoute)
keys_router = Router(tags=["audit"])

Limit = Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX, description="Page size"), PlainDigits]
Cursor = Annotated[
    str | None,
    Query(max_length=queries.CURSOR_MAX, description="`next_cursor` of the previous page"),
]
Timestamp = Annotated[
    ClientTime | None,
    Query(description="RFC 3339 with a time zone, e.g. 2026-11-24T10:00:00Z"),
]


@router.get(
    "/audit-events",
    response_model=AuditPage,
    responses=error_responses(400, 401, 403),
    summary="The caller's audit events, newest first",
)
def list_audit_events(
    user: CurrentUser,
    session: ReadSessionDep,
    settings: SettingsDep,
    user_id: UserIdPath,
    limit: Limit = 50,
    cursor: Cursor = None,
    task_id: Annotated[int | None, Query(ge=1, le=BIGINT_MAX), PlainDigits] = None,
    action: AuditAction | None = None,
    since: Annotated[ClientTimeRoundedUp | None, Query(description="Inclusive lower bound")] = None,
    until: Annotated[ClientTimeRoundedUp | None, Query(description="Exclusive upper bound")] = None,
    request_id: Annotated[
        str | None, Query(min_length=1, max_length=REQUEST_ID_MAX, pattern=r"^[\x20-\x7e]+$")
    ] = None,
    trace_id: Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$")] = None,
) -> Any:
    page = queries.list_events(
        session,
        user.user_id,
        limit=limit,
        cursor=cursor,
        task_id=task_id,
        action=action,
        since=since,
        until=until,
        request_id=request_id,
        trace_id=trace_id,
    )
    return json_response(
        AuditPage(
            items=[AuditEventPublic.from_row(row, settings.jaeger_ui_url) for row in page.items],
            next_cursor=page.next_cursor,
        )
    )


@router.get(
    "/audit-events/verify",
    response_model=VerifyReport,
    responses=error_responses(400, 401, 403),
    summary="Verify the caller's hash chain, from where it was last verified",
    dependencies=[Depends(expensive_operation)],
    description="200 with `ok: false` and the first bad seq when the chain does not verify. "
    "Checks the events appended since the last call that found the chain intact (and that the "
    "last verified event is unchanged); `full=true` recomputes every event from seq 1, and "
    "the last verified event must still be in the chain with its hash. After a check that "
    "failed, every check recomputes the whole chain until one passes.",
)
@get_only  # it records what it found: no HEAD
def verify_audit_chain(
    user: CurrentUser,
    session: SessionDep,
    user_id: UserIdPath,
    full: Annotated[bool, Query(description="Recompute the whole chain from seq 1")] = False,
) -> Any:
    report = verify_and_record(session, user.user_id, full=full)
    if not report.ok:
        _report_failure(report, full)
    return json_response(VerifyReport.model_validate(report.as_dict()))


def _report_failure(report: ChainReport, full: bool) -> None:
    """A broken chain is evidence of tampering: more than the 200 of the access line."""
    mode: metrics.VerifyMode = "full" if full else "incremental"
    log.warning(
        "audit chain verification failed",
        extra={
            "user_id": report.user_id,
            "first_bad_seq": report.first_bad_seq,
            "reason": report.reason,
            "mode": mode,
        },
    )
    metrics.audit_verify_failed(mode)


@router.get(
    "/audit-events/proof",
    response_model=AuditProof,
    responses=error_responses(400, 401, 403, 404),
    summary="The caller's chain head in the latest signed checkpoint, with its Merkle path",
    description="404 when no checkpoint has been made since the caller's first event.",
)
def audit_proof(
    request: Request, user: CurrentUser, session: SessionDep, user_id: UserIdPath
) -> Any:
    proofs: LatestProofs = request.app.state.audit_proofs
    proof = proofs.proof(session, user.user_id)
    if proof is None:
        raise NotFound("No checkpoint covers this user's audit events yet.")
    return json_response(AuditProof.model_validate(proof))


@keys_router.get(
    "/.well-known/audit-keys.json",
    response_model=AuditKeys,
    responses=error_responses(404),
    summary="The public key that verifies audit checkpoints (a JWK set)",
)
async def audit_keys(request: Request) -> Any:
    key = request.app.state.audit_signing_key
    if key is None:
        raise NotFound("This service does not sign audit checkpoints.")
    return AuditKeys.model_validate({"keys": [key.public.jwk()]})


@router.get(
    "/tasks/{task_id}/history",
    response_model=TaskHistory | TaskAsOf,
    responses=error_responses(400, 401, 403, 404),
    summary="A task's events, oldest first; or with `as_of`, the task as it was then",
    dependencies=[Depends(expensive_operation)],
    description="Kept after the task is deleted. 404 if the task never existed for this user "
    "or, with `as_of`, did not exist at that time.",
)
def task_history(
    user: CurrentUser,
    session: ReadSessionDep,
    settings: SettingsDep,
    user_id: UserIdPath,
    task_id: TaskIdPath,
    as_of: Timestamp = None,
    limit: Limit = 500,
    cursor: Cursor = None,
) -> Any:
    if as_of is not None:
        if cursor is not None:
            raise InvalidInput("`cursor` cannot be combined with `as_of`.", field="query.cursor")
        row = queries.task_as_of(session, user.user_id, task_id, as_of)
        return json_response(
            TaskAsOf(
                task_id=task_id,
                as_of=as_of,
                task=TaskSnapshot.of_event(row["after"]),
                event_seq=row["seq"],
                event_occurred_at=row["occurred_at"],
            )
        )
    page = queries.task_history(session, user.user_id, task_id, limit=limit, cursor=cursor)
    return json_response(
        TaskHistory(
            task_id=task_id,
            items=[AuditEventPublic.from_row(row, settings.jaeger_ui_url) for row in page.items],
            next_cursor=page.next_cursor,
        )
    )
