"""The six task endpoints. Thin: validation in `models`, reads in `queries`, writes in `rules`."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

from fastapi import Body, Depends, Header, Query, Request, Response, status

from audit.deps import AuditCtx
from audit.schemas import ClientTime, ClientTimeRoundedUp
from service import paging
from service.conditional import IfMatch, IfNoneMatch, matches
from service.deps import (
    CurrentUser,
    PlainDigits,
    ReadSessionDep,
    SessionDep,
    TaskIdPath,
    UnitOfWorkRoute,
    UserIdPath,
)
from service.exceptions import InvalidInput
from service.limits import OFFSET_MAX, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from service.openapi import error_responses, with_headers
from service.priority import Priority
from service.responses import json_response, next_page_link, url_for
from service.routing import Router
from service.tags.rules import TAG_NAME_MAX, TAG_NAME_PATTERN, TAGS_PER_TASK_MAX, clean_tag_name
from service.tasks import idempotency, queries, rules
from service.tasks.models import (
    SEARCH_MAX,
    TaskCompletion,
    TaskCreate,
    TaskPublic,
    TaskRecord,
    TaskUpdate,
    etag_for,
    search_text_error,
)
from service.tasks.queries import SortField, SortOrder, StatusFilter, TaskFilter

router = Router(prefix="/api/{user_id}/tasks", tags=["tasks"], route_class=UnitOfWorkRoute)


async def _idempotency_key(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=idempotency.KEY_MAX,
            pattern=idempotency.KEY_PATTERN,
            description="Makes a retried create safe: the same key and body within the retention "
            "period (IDEMPOTENCY_RETENTION_SECONDS, 24 hours unless configured) "
            "return the first response (same task); the same key with another body is 409. "
            "One header line: a second is 400.",
        ),
    ] = None,
) -> str | None:
    """The key, from its only header line: with two, one of them would be ignored (a key may
    hold a comma, so they cannot be read as one list either)."""
    if len(request.headers.getlist("idempotency-key")) > 1:
        message = "Send one Idempotency-Key header, not several."
        raise InvalidInput(message, field="header.idempotency-key")
    return idempotency_key


IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]
# As a tag name on a task; checked (with the 400 naming it) by `_tag_filter`.
TagFilterName = Annotated[
    str, Query(max_length=TAG_NAME_MAX * 4, json_schema_extra={"pattern": TAG_NAME_PATTERN})
]


def _task_response(request: Request, task: TaskRecord) -> Response:
    headers = {"ETag": task.etag}
    if task.next_task_id is not None:
        url = url_for(request, "get_task", user_id=task.user_id, task_id=task.next_task_id)
        headers["Link"] = f'<{url}>; rel="next-occurrence"'
    return json_response(queries.public_json(task), headers=headers)


def _tag_filter(names: list[str] | None) -> tuple[str, ...]:
    if not names:
        return ()
    if len(names) > TAGS_PER_TASK_MAX:
        raise InvalidInput(f"Filter by at most {TAGS_PER_TASK_MAX} tags.", field="query.tag")
    cleaned = []
    for index, name in enumerate(names):
        try:
            cleaned.append(clean_tag_name(name))
        except ValueError as exc:
            raise InvalidInput(f"{exc}.", field=f"query.tag.{index}") from None
    return tuple(cleaned)


def _search_text(value: str | None) -> str | None:
    if value is not None and (error := search_text_error(value)):
        raise InvalidInput(f"The search text {error}.", field="query.q")
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
    session: ReadSessionDep,
    user_id: UserIdPath,
    status_: Annotated[StatusFilter, Query(alias="status")] = StatusFilter.all,
    q: Annotated[
        str | None,
        Query(
            max_length=SEARCH_MAX,
            description="Case-insensitive search in title and description; `%` and `_` are literal",
        ),
    ] = None,
    priority: Annotated[
        list[Priority] | None,
        Query(description="Repeatable: tasks with any of these priorities"),
    ] = None,
    tag: Annotated[
        list[TagFilterName] | None,
        Query(
            max_length=TAGS_PER_TASK_MAX,
            description="Repeatable: tasks carrying every one of these tags (names ignore case)",
        ),
    ] = None,
    due_before: Annotated[
        ClientTimeRoundedUp | None, Query(description="Due strictly before this time (RFC 3339)")
    ] = None,
    due_after: Annotated[
        ClientTime | None, Query(description="Due strictly after this time (RFC 3339)")
    ] = None,
    overdue: Annotated[
        bool,
        Query(description="`true`: due in the past and not completed (`false`: no filter)"),
    ] = False,
    sort: Annotated[
        SortField,
        Query(description="`priority` sorts by rank; tasks without due_at come last"),
    ] = SortField.created_at,
    order: SortOrder = SortOrder.desc,
    limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX), PlainDigits] = PAGE_SIZE_DEFAULT,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX), PlainDigits] = 0,
    after: Annotated[
        str | None,
        Query(
            max_length=paging.CURSOR_MAX,
            description="Continue after the last task of a page: the value in its "
            '`Link: rel="next"` (not with `offset`)',
        ),
    ] = None,
) -> Any:
    filters = TaskFilter(
        status=status_,
        q=_search_text(q) or None,
        priorities=tuple(dict.fromkeys(priority or ())),
        tags=_tag_filter(tag),
        due_before=due_before,
        due_after=due_after,
        overdue=overdue,
    )
    paging.check_start(after, offset)
    page = queries.list_tasks(
        session,
        user.user_id,
        filters=filters,
        sort=sort,
        order=order,
        limit=limit,
        offset=offset,
        after=None if after is None else queries.decode_after(after, sort, order),
    )
    headers = {"X-Total-Count": str(page.total)}
    if page.more:
        cursor = queries.encode_after(page.items[-1], sort, order)
        headers["Link"] = next_page_link(request, after=cursor, limit=limit)
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
    idempotency_key: IdempotencyKey,
) -> Any:
    public, replayed = rules.create_task_once(
        session,
        ctx,
        user.user_id,
        body,
        key=idempotency_key,
        retention=request.app.state.settings.idempotency_retention,
    )
    return _created(request, user.user_id, public, replayed=replayed)


_PUBLIC_ORDER = tuple(field.name for field in dataclasses.fields(TaskPublic))


def _created(
    request: Request, user_id: str, public: dict[str, Any], *, replayed: bool = False
) -> Response:
    task_id = public["id"]
    headers = {
        "Location": str(url_for(request, "get_task", user_id=user_id, task_id=task_id)),
        # A new task is at version 1; a replay answers exactly as the first response did.
        "ETag": etag_for(task_id, 1),
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
        # Stored as jsonb, which orders keys its own way: back in the response's order.
        public = {name: public[name] for name in _PUBLIC_ORDER if name in public} | public
    return json_response(
        json.dumps(public, separators=(",", ":")).encode(), status.HTTP_201_CREATED, headers
    )


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    responses={
        200: with_headers("ETag", "Link"),
        304: {
            "description": "If-None-Match lists the current ETag: no body",
            **with_headers("ETag"),
        },
        **error_responses(400, 401, 403, 404),
    },
    summary="Get a task",
    name="get_task",
)
def get_task(
    request: Request,
    user: CurrentUser,
    session: ReadSessionDep,
    task_id: TaskIdPath,
    if_none_match: IfNoneMatch = None,
) -> Any:
    task = queries.get_task(session, user.user_id, task_id)
    if if_none_match is not None and matches(task.etag, if_none_match):
        # RFC 9110 15.4.5: the ETag a 200 would carry, and no body.
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": task.etag})
    return _task_response(request, task)


@router.put(
    "/{task_id}",
    response_model=TaskPublic,
    responses={
        200: with_headers("ETag", "Link"),
        **error_responses(400, 401, 403, 404, 412, 413, 415),
    },
    summary="Update a task (partial: absent fields stay as they are)",
)
def update_task(
    request: Request,
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    body: TaskUpdate,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
) -> Any:
    change = rules.update_task(
        session, ctx, user.user_id, task_id, body, if_match=if_match, if_none_match=if_none_match
    )
    return _task_response(request, change.task)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    # It reads no body, but one sent must still be JSON and within MAX_BODY_BYTES.
    responses=error_responses(400, 401, 403, 404, 412, 413, 415),
    summary="Delete a task",
)
def delete_task(
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
) -> None:
    rules.delete_task(
        session, ctx, user.user_id, task_id, if_match=if_match, if_none_match=if_none_match
    )


@router.patch(
    "/{task_id}/complete",
    response_model=TaskPublic,
    responses={
        200: with_headers("ETag", "Link"),
        **error_responses(400, 401, 403, 404, 412, 413, 415),
    },
    summary='Toggle completion, or set it with {"completed": true|false}',
)
def complete_task(
    request: Request,
    user: CurrentUser,
    ctx: AuditCtx,
    session: SessionDep,
    task_id: TaskIdPath,
    body: Annotated[TaskCompletion | None, Body()] = None,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
) -> Any:
    completed = body.completed if body is not None else None
    change = rules.set_completed(
        session,
        ctx,
        user.user_id,
        task_id,
        completed,
        if_match=if_match,
        if_none_match=if_none_match,
    )
    return _task_response(request, change.task)
