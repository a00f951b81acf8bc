"""Column types shared by the tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, DateTime, Dialect, func, literal_column
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

# bigint identity keys.
ID_TYPE = BigInteger()

JSONType = JSONB()


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz`, refusing naive datetimes on the way in and read back in UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        parsed: datetime = value
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


# A day inside Python's first and last: in any session time zone, still years 1 and 9999.
_FIRST_TIME = literal_column("'0001-01-02 00:00:00+00'::timestamptz", DateTime(timezone=True))
_LAST_TIME = literal_column("'9999-12-30 23:59:59.999999+00'::timestamptz", DateTime(timezone=True))


class ReadableUTCDateTime(UTCDateTime):
    """`UTCDateTime`, read within years 1 to 9999, where Python's datetime ends (a time
    outside reads as the nearest of two bounds a day inside): `timestamptz` goes further, and
    psycopg2 fails the whole result on one such value. For the audit log's time, which only a
    hand that disabled its triggers can set out there: the log must still be listed, streamed
    and exported, and verifying it report the event as altered (its hash covers the time as
    written). Clamped in the SELECT, not by a typecaster, which would cost every timestamp
    the app reads."""

    cache_ok = True

    def column_expression(self, colexpr: ColumnElement[Any]) -> ColumnElement[Any]:
        return func.least(func.greatest(colexpr, _FIRST_TIME), _LAST_TIME, type_=self)


def utcnow() -> datetime:
    return datetime.now(UTC)
