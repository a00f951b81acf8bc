"""Keyset cursors: where a page continues, opaque to clients.

A `Link: rel="next"` carries `?after=<cursor>`: the last item's sort key, not an offset, so
items completed, deleted or added while a client pages do not make it skip or repeat others.
A cursor is base64url JSON, `[kind, ...key]`; each list checks the key it reads back. The
audit feed's cursors (audit/queries.py) wrap their own text the same way.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from service.exceptions import InvalidInput
from service.limits import BIGINT_MAX

# Room for the longest key, a title of 200 four-byte characters (800 bytes, 1,100 in base64).
CURSOR_MAX = 2048
FIELD = "query.after"


def check_start(after: str | None, offset: int) -> None:
    """A page starts after a cursor or at an offset, not at both."""
    if after is not None and offset:
        raise InvalidInput("Give `after` or `offset`, not both.", field=FIELD)


def wrap(text: str) -> str:
    """A cursor as clients get it: `text` in base64url, unpadded (the audit feed's cursors
    too, around their own text)."""
    return base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def unwrap(cursor: str, max_length: int = CURSOR_MAX) -> bytes:
    """The bytes `wrap` was given; raises ValueError for what it cannot have made."""
    if len(cursor) > max_length or not cursor.isascii():
        raise ValueError("not a cursor")
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))


def encode(kind: str, *key: Any) -> str:
    values = [kind, *(v.isoformat() if isinstance(v, datetime) else v for v in key)]
    return wrap(json.dumps(values, ensure_ascii=False, separators=(",", ":")))


def decode(cursor: str, kind: str) -> list[Any]:
    """The key `encode(kind, ...)` wrote; raises ValueError for anything else."""
    try:
        values = json.loads(unwrap(cursor))
    # binascii.Error, UnicodeDecodeError and bad JSON are ValueErrors; JSON nested deeper
    # than Python recurses (1,500 `[` fit in a cursor) is a RecursionError.
    except (ValueError, RecursionError) as exc:
        raise ValueError("not a cursor") from exc
    if not isinstance(values, list) or not values or values[0] != kind:
        raise ValueError("another list's cursor")
    return values[1:]


def aware_time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    if moment is None or moment.tzinfo is None:
        raise ValueError("not a time with a zone")
    try:
        # What the database compares it as; past year 9999 (or before year 1) there is none.
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


def item_id(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= BIGINT_MAX:
        raise ValueError("not an id")
    return value


def invalid() -> InvalidInput:
    return InvalidInput(
        "`after` is not valid here: use the link of a page of this list, sorted the same way.",
        field=FIELD,
    )
