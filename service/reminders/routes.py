"""`GET /api/{user_id}/reminders`: the user's reminders, pending or fired, for a frontend that
polls (the change feed pushes the same firings as `reminder.fired` events)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Query, Request
from pydantic import BaseModel, Field, TypeAdapter

from service import paging
from service.deps import CurrentUser, PlainDigits, ReadSessionDep, UnitOfWorkRoute, UserIdPath
from service.limits import OFFSET_MAX, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from service.openapi import error_responses, with_headers
from service.reminders import queries
from service.reminders.queries import ReminderState
from service.responses import json_response, next_page_link
from service.routing import Router

router = Router(prefix="/api/{user_id}/reminders", tags=["reminders"], route_class=UnitOfWorkRoute)


class ReminderPublic(BaseModel):
    """A task's reminder. `pending`: armed, not fired yet (its time may have passed by less
    than a poll interval). `fired`: its `reminder.fired` event is in the audit log."""

    task_id: int
    title: str
    remind_at: datetime = Field(description="In UTC")
    due_at: datetime | None = Field(description="In UTC")
    state: ReminderState
    fired_at: datetime | None = Field(description="When it fired (database clock); null if pending")
    late: bool = Field(
        description="Fired more than REMINDER_GRACE_SECONDS after `remind_at` (e.g. the "
        "service was down then); false while pending"
    )


_LIST = TypeAdapter(list[ReminderPublic])


@router.get(
    "",
    response_model=list[ReminderPublic],
    responses={200: with_headers("Link"), **error_responses(400, 401, 403)},
    summary="List the user's reminders (pending and fired), by time",
)
def list_reminders(
    request: Request,
    user: CurrentUser,
    session: ReadSessionDep,
    user_id: UserIdPath,
    state: Annotated[
        ReminderState | None,
        Query(description="`pending` or `fired`; both when absent (never a cancelled one)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX), PlainDigits] = PAGE_SIZE_DEFAULT,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX), PlainDigits] = 0,
    after: Annotated[
        str | None,
        Query(
            max_length=paging.CURSOR_MAX,
            description="Continue after the last reminder of a page: the value in its `Link: "
            'rel="next"` (not with `offset`)',
        ),
    ] = None,
) -> Any:
    paging.check_start(after, offset)
    start = None if after is None else queries.decode_after(after)
    rows = queries.list_reminders(session, user.user_id, state, limit + 1, offset, start)
    headers = {}
    if len(rows) > limit:
        rows = rows[:limit]
        cursor = queries.encode_after(rows[-1])
        headers["Link"] = next_page_link(request, after=cursor, limit=limit)
    items = [ReminderPublic.model_validate(row, from_attributes=True) for row in rows]
    return json_response(_LIST.dump_json(items), headers=headers)
