"""A task's priority, apart from the task package: the audit log's snapshot (which must not
import it) records the same enum, so OpenAPI has one `Priority` schema."""

from __future__ import annotations

from enum import StrEnum


class Priority(StrEnum):
    """Sorted by rank (none < low < medium < high), not alphabetically: a PostgreSQL enum
    orders its values as declared."""

    none = "none"
    low = "low"
    medium = "medium"
    high = "high"
