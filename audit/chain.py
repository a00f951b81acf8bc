"""The hash chain: canonical encoding of an event and its SHA-256 link to the previous one.

Changing what is hashed (an event's fields, or how they are encoded) means a new HASH_VERSION
with its own field list; old events keep verifying under the version they were written with.
A new task field needs none: `before` and `after` are hashed whole, whatever they hold.

From version 3 on the writer computes the hash in PostgreSQL, inside the statement that appends
the event (`audit.recorder`): the canonical encoding is then the text PostgreSQL prints for the
event as a `jsonb` object, which `jsonb_text` reproduces byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64
HASH_VERSION = 3

# The fields covered by the hash, per version. `prev_hash` links the chain.
_V1 = (
    "user_id",
    "seq",
    "prev_hash",
    "occurred_at",
    "actor_id",
    "action",
    "entity_type",
    "entity_id",
    "before",
    "after",
    "changes",
    "request_id",
    "trace_id",
    "span_id",
    "client_ip",
    "user_agent",
)
HASHED_FIELDS: dict[int, tuple[str, ...]] = {
    1: _V1,
    # 2: the event that caused this one (a recurring task's completion, for the next
    # occurrence's task.created). Task states from here on also carry priority, due_at, tags,
    # recurrence and the series links (the hash covers `before`/`after` whole, in any version).
    2: (*_V1, "caused_by_seq"),
    # 3: the same fields, encoded as PostgreSQL's jsonb text (`jsonb_text`) instead of
    # compact sorted-key JSON, so that the database can compute the hash.
    3: (*_V1, "caused_by_seq"),
}
# The versions whose encoding is `jsonb_text`; the earlier ones use compact sorted-key JSON.
JSONB_ENCODED_FROM = 3


def format_timestamp(value: datetime) -> str:
    """UTC at microsecond precision, always the same width."""
    if value.tzinfo is None:
        raise ValueError("naive datetime in an audit event")
    # isoformat pads the year to four digits (strftime's %Y does not below year 1000).
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _canonical_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(value)
    return value


def _jsonb_ordered(value: Any) -> Any:
    """Objects' keys in jsonb's storage order: shorter keys first, then by their UTF-8 bytes."""
    if isinstance(value, dict):
        order = sorted(value, key=lambda key: (len(key.encode()), key.encode()))
        return {key: _jsonb_ordered(value[key]) for key in order}
    if isinstance(value, list):
        return [_jsonb_ordered(item) for item in value]
    return value


def jsonb_text(value: Any) -> str:
    """What PostgreSQL prints for `value` as jsonb (`value::jsonb::text`).

    jsonb keeps no key order of its own and prints `", "` and `": "` between items; it escapes
    strings as `json.dumps(ensure_ascii=False)` does. Holds for what events contain: objects,
    arrays, strings, integers, booleans and nulls.
    """
    return json.dumps(
        _jsonb_ordered(value), separators=(", ", ": "), ensure_ascii=False, allow_nan=False
    )


def canonical_bytes(event: Mapping[str, Any], version: int = HASH_VERSION) -> bytes:
    """Raises ValueError (as for a number JSON cannot hold) for a value nested deeper than
    the encoding recurses: JSON read back (a row, a file) may be, as the parser goes deeper."""
    fields = HASHED_FIELDS[version]
    body = {name: _canonical_value(event[name]) for name in fields}
    body["hash_version"] = version
    try:
        if version >= JSONB_ENCODED_FROM:
            return jsonb_text(body).encode("utf-8")
        return json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except RecursionError:
        raise ValueError("a value is nested too deep to encode") from None


def compute_hash(event: Mapping[str, Any], version: int = HASH_VERSION) -> str:
    return hashlib.sha256(canonical_bytes(event, version)).hexdigest()
