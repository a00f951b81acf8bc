"""The six task endpoints. Thin: validation in `models`, reads in `queries`, writes in `rules`."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response, status

from audit.deps import AuditCtx
from service.deps import CurrentUser, SessionDep, TaskIdPath, UserIdPath
from service.exceptions import InvalidInput
from service.openapi import error_responses, with_headers
from service.responses import json_response
from service.tasks import idempotency, queries, rules
from service.tasks.models import (
    TaskCompletion,
    TaskCreate,
    TaskPublic,
    TaskRecord,
    TaskUpdate,
    etag_for,
)
from service.tasks.queries import SortField, SortOrder, StatusFilter

router = APIRouter(prefix="/api/{user_id}/tasks", tags=["tasks"])

IfMatch = Annotated[
    str | None,
    Header(
        max_length=256,
        description="ETag from an earlier response; a stale one gives 412.",
    ),
]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=idempotency.KEY_MAX,
        pattern=idempotency.KEY_PATTERN,
        description="Makes a retried create safe: the same key and body within 24 hours "
        "return the first response (same task); the same key with another body is 409.",
    ),
]
SEARCH_MAX = 200


def _task_response(
    task: TaskRecord, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return json_response(
        queries.public_json(task),
        status_code,
        {**(headers or {}), "ETag": task.etag},
    )


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise InvalidInput("The search text must not contain NUL characters.", field="query.q")
    return value


@router.get(
    "",
    response_model=list[TaskPublic],
    responses={200: with_headers("X-Total-Count", "Link"), **error_responses(400, 401, 403)},
    summary="List the user's tasks",
)
def list_tasks(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    user_id: UserIdPath,
    status_: Annotated[StatusFilter, Query(alias="status")] = StatusFilter.all,
    q: Annotated[str | None, Query(max_length=SEARCH_MAX)] = None,
    sort: SortField = SortField.created_at,
    order: SortOrder = SortOrder.desc,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Any:
    page = queries.list_tasks(
        session,
        user.user_id,
        status=status_,
        q=_no_nul(q),
        sort=sort,
        order=order,
        limit=limit,
        offset=offset,
    )
    headers = {"X-Total-Count": str(page.total)}
    if offset + len(page.items) < page.total:
        next_url = request.url.include_query_params(offset=offset + limit, limit=limit)
        headers["Link"] = f'<{next_url}>; rel="next"'
    return json_response(queries.public_list_json(page.items), headers=headers)


@router.post(
    "",
    response_model=TaskPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: with_headers("Location", "ETag", "Idempotent-Replayed"),
        **error_responses(400, 401, 403, 409, 413, 415),
    },
    summary="Create a task",
)
def create_task(
    request: Request,
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    body: TaskCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Any:
    if idempotency_key is not None:
        fingerprint = idempotency.request_fingerprint(body.model_dump())
        retention = request.app.state.settings.idempotency_retention
        stored = idempotency.claim(session, user.user_id, idempotency_key, fingerprint, retention)
        if stored is not None:
            return _created(request, user.user_id, stored.body, replayed=True)
    change = rules.create_task(session, ctx, user.user_id, body)
    public = queries.public(change.task)
    if idempotency_key is not None:
        idempotency.store_response(session, user.user_id, idempotency_key, 201, public)
    return _created(request, user.user_id, public)


def _created(
    request: Request, user_id: str, public: dict[str, Any], *, replayed: bool = False
) -> Response:
    task_id = public["id"]
    headers = {
        "Location": str(request.url_for("get_task", user_id=user_id, task_id=task_id)),
        # A new task is at version 1; a replay answers exactly as the first response did.
        "ETag": etag_for(task_id, 1),
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(
        json.dumps(public, separators=(",", ":")).encode(), status.HTTP_201_CREATED, headers
    )


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    responses={200: with_headers("ETag"), **error_responses(400, 401, 403, 404)},
    summary="Get a task",
    name="get_task",
)
def get_task(user: CurrentUser, session: SessionDep, task_id: TaskIdPath) -> Any:
    return _task_response(queries.get_task(session, user.user_id, task_id))


@router.put(
    "/{task_id}",
    response_model=TaskPublic,
    responses={200: with_headers("ETag"), **error_responses(400, 401, 403, 404, 412, 413, 415)},
    summary="Update a task (partial: absent fields stay as they are)",
)
def update_task(
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    body: TaskUpdate,
    if_match: IfMatch = None,
) -> Any:
    change = rules.update_task(session, ctx, user.user_id, task_id, body, if_match=if_match)
    return _task_response(change.task)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(400, 401, 403, 404, 412),
    summary="Delete a task",
)
def delete_task(
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    if_match: IfMatch = None,
) -> None:
    rules.delete_task(session, ctx, user.user_id, task_id, if_match=if_match)


@router.patch(
    "/{task_id}/complete",
    response_model=TaskPublic,
    responses={200: with_headers("ETag"), **error_responses(400, 401, 403, 404, 412, 413, 415)},
    summary='Toggle completion, or set it with {"completed": true|false}',
)
def complete_task(
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    body: Annotated[TaskCompletion | None, Body()] = None,
    if_match: IfMatch = None,
) -> Any:
    completed = body.completed if body is not None else None
    change = rules.set_completed(session, ctx, user.user_id, task_id, completed, if_match=if_match)
    return _task_response(change.task)
