"""The tag endpoints. Thin: rules in `service.tags`, and the task side of a rename or delete
(one audit event per task) in `service.tasks.rules`. Here, in the task package, because
renaming or deleting a tag changes tasks; `service.tags` knows nothing of tasks. A rename or
delete costs in proportion to the tag's tasks, so it counts against `RATE_LIMIT_EXPENSIVE`."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response, status
from pydantic import TypeAdapter

from audit.deps import AuditCtx
from service.database import on_commit
from service.deps import (
    CurrentUser,
    ReadSessionDep,
    SessionDep,
    UnitOfWorkRoute,
    UserIdPath,
    digits_only,
)
from service.limits import BIGINT_MAX
from service.openapi import error_responses, with_headers
from service.ratelimit import expensive_operation
from service.responses import json_response, url_for
from service.routing import Router
from service.tags import queries
from service.tags.models import TagCreate, TagPublic, TagUpdate
from service.tags.queries import TagRecord
from service.tasks import rules

router = Router(prefix="/api/{user_id}/tags", tags=["tags"], route_class=UnitOfWorkRoute)
log = logging.getLogger("service.tags")

TagIdPath = Annotated[
    int, Path(ge=1, le=BIGINT_MAX, description="The tag's id"), digits_only("a tag id")
]
_ONE = TypeAdapter(TagRecord)
_MANY = TypeAdapter(list[TagRecord])


def _log(session: Any, action: str, user_id: str, tag_id: int, tasks_changed: int = 0) -> None:
    """One INFO line once the change is durable: ids and counts, never the tag's name."""
    extra = {"event": action, "user_id": user_id, "tag_id": tag_id, "tasks_changed": tasks_changed}
    on_commit(session, lambda: log.info(action, extra=extra))


@router.get(
    "",
    response_model=list[TagPublic],
    responses=error_responses(400, 401, 403),
    summary="List the user's tags with their task counts, by name",
)
def list_tags(user: CurrentUser, session: ReadSessionDep, user_id: UserIdPath) -> Any:
    return json_response(_MANY.dump_json(queries.list_tags(session, user.user_id)))


@router.post(
    "",
    response_model=TagPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "model": TagPublic,
            "description": "A tag of that name (ignoring case) exists: it is returned as is",
        },
        201: with_headers("Location"),
        **error_responses(400, 401, 403, 409, 413, 415),
    },
    summary="Create a tag",
)
def create_tag(
    request: Request, user: CurrentUser, session: SessionDep, user_id: UserIdPath, body: TagCreate
) -> Any:
    tag, created = queries.create_tag(session, user.user_id, body.name)
    if not created:
        return json_response(_ONE.dump_json(tag))
    _log(session, "tag.created", user.user_id, tag.id)
    location = str(url_for(request, "get_tag", user_id=user.user_id, tag_id=tag.id))
    return json_response(_ONE.dump_json(tag), status.HTTP_201_CREATED, {"Location": location})


@router.get(
    "/{tag_id}",
    response_model=TagPublic,
    responses=error_responses(400, 401, 403, 404),
    summary="Get a tag",
    name="get_tag",
)
def get_tag(user: CurrentUser, session: ReadSessionDep, tag_id: TagIdPath) -> Any:
    return json_response(_ONE.dump_json(queries.get_tag(session, user.user_id, tag_id)))


@router.patch(
    "/{tag_id}",
    response_model=TagPublic,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415),
    summary="Rename a tag (every task carrying it records the change in its history)",
    # One audit event per task carrying the tag: counted as expensive, whatever it changes.
    dependencies=[Depends(expensive_operation)],
)
def rename_tag(
    user: CurrentUser, ctx: AuditCtx, session: SessionDep, tag_id: TagIdPath, body: TagUpdate
) -> Any:
    events = rules.rename_tag(session, ctx, user.user_id, tag_id, body.name)
    _log(session, "tag.renamed", user.user_id, tag_id, len(events))
    return json_response(_ONE.dump_json(queries.get_tag(session, user.user_id, tag_id)))


@router.delete(
    "/{tag_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    # It reads no body, but one sent must still be JSON and within MAX_BODY_BYTES.
    responses=error_responses(400, 401, 403, 404, 413, 415),
    summary="Delete a tag (removed from every task, each recording the change)",
    dependencies=[Depends(expensive_operation)],
)
def delete_tag(user: CurrentUser, ctx: AuditCtx, session: SessionDep, tag_id: TagIdPath) -> None:
    events = rules.delete_tag(session, ctx, user.user_id, tag_id)
    _log(session, "tag.deleted", user.user_id, tag_id, len(events))
