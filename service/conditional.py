"""Conditional requests (RFC 9110 13.1): the ETags listed in `If-Match` and `If-None-Match`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.exceptions import InvalidInput

# Per header line: a task's ETag is about 20 characters.
LINE_MAX = 256

ETags = frozenset[str]


def listed_etags(request: Request, name: str) -> ETags | None:
    """The tags listed over every line of header `name` (RFC 9110 5.3: a list may be split over
    several lines, and FastAPI's `str` header reads only the first); None when it is absent."""
    lines = request.headers.getlist(name)
    if not lines:
        return None
    if any(len(line) > LINE_MAX for line in lines):
        message = f"Each {name} line must have at most {LINE_MAX} characters."
        raise InvalidInput(message, field=f"header.{name.lower()}")
    return frozenset(tag.strip() for line in lines for tag in line.split(",") if tag.strip())


def matches(etag: str, listed: ETags) -> bool:
    """Weak comparison (RFC 9110 8.8.3.2): `W/"7-3"` matches `"7-3"`; `*` matches any current
    resource. Weak for If-Match too: a compressing proxy (nginx with gzip) weakens the ETag
    its clients see."""
    opaque = etag.removeprefix("W/")
    return "*" in listed or any(tag.removeprefix("W/") == opaque for tag in listed)


# Async: a sync dependency would cost a thread-pool hop of its own (tests/test_thread_hops.py).
async def _if_match(
    request: Request,
    if_match: Annotated[
        str | None,
        Header(
            max_length=LINE_MAX,
            description="ETags from earlier responses (a comma-separated list, on one or more "
            "lines), or `*`; none of them current gives 412.",
        ),
    ] = None,
) -> ETags | None:
    return listed_etags(request, "If-Match")


async def _if_none_match(
    request: Request,
    if_none_match: Annotated[
        str | None,
        Header(
            max_length=LINE_MAX,
            description="ETags from earlier responses (a comma-separated list, on one or more "
            "lines), or `*`; one of them current gives 304 without a body on a GET, and 412 "
            "(nothing changed) on a write.",
        ),
    ] = None,
) -> ETags | None:
    return listed_etags(request, "If-None-Match")


IfMatch = Annotated[ETags | None, Depends(_if_match)]
IfNoneMatch = Annotated[ETags | None, Depends(_if_none_match)]
