"""Exporting audit events as NDJSON or CSV, closed by a record of each chain's head.

The whole export reads one snapshot (see `audit.verify.snapshot`) and streams: the events with a
server-side cursor, then the closing record. The heads in the closing record are the chains'
heads at export time; `todo-api audit verify --against FILE` later checks that the event at each
head seq still has that hash, so an export can be held against the live chain.

NDJSON: one `{"record": "event", ...}` object per event (the API's fields without trace_url),
then one `{"record": "end", "count": N, "chains": [{user_id, events, head_seq, head_hash}],
...}`.

CSV: the header `record,<event columns>,count`; `event` rows; then one `chain` row per chain
(user_id, seq = head seq, hash = head hash, count = its exported events) and an `end` row
(occurred_at = export time, count = all exported events). JSON columns hold compact JSON and
null is an empty cell. A cell that a spreadsheet would run as a formula (it starts with `=`, `+`,
`-`, `@`, a tab or a carriage return: client text such as an `X-Request-ID` of `=1+2`) is
written with a `'` in front, and so is one that starts with `'`, so that `unescape_cell` gives
back every stored value exactly (hashes can be recomputed from the file after it). NDJSON is
written as stored.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection, func, select

from audit.chain import format_timestamp
from audit.models import EVENTS, HEADS
from audit.queries import PUBLIC_COLUMNS
from audit.verify import Anchor
from service.sqltypes import UTCDateTime

EVENT_FIELDS = tuple(column.name for column in PUBLIC_COLUMNS)
JSON_FIELDS = frozenset({"before", "after", "changes"})
CSV_HEADER = ("record", *EVENT_FIELDS, "count")
STREAM_BATCH = 1000


# OWASP's CSV injection list; `'` too, so that an escaped cell is told from a stored `'`.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_STARTS = (*_FORMULA_STARTS, "'")


def escape_cell(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text instead of evaluating (`'` in front)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_ESCAPED_STARTS) else text


def unescape_cell(cell: str) -> str:
    """The value `escape_cell` was given (as text; None and "" both give "")."""
    return cell[1:] if cell.startswith("'") else cell


class ExportFormat(StrEnum):
    ndjson = "ndjson"
    csv = "csv"


class ExportFileError(ValueError):
    """The file is not a complete export (no closing record, or not an export at all)."""


@dataclass(frozen=True, slots=True)
class ChainHead:
    user_id: str
    events: int
    head_seq: int | None
    head_hash: str | None


@dataclass(frozen=True, slots=True)
class ExportSummary:
    count: int
    chains: int


def _filters(user_id: str | None, since: datetime | None, until: datetime | None) -> list[Any]:
    conditions: list[Any] = []
    if user_id is not None:
        conditions.append(EVENTS.c.user_id == user_id)
    if since is not None:
        conditions.append(EVENTS.c.occurred_at >= since)
    if until is not None:
        conditions.append(EVENTS.c.occurred_at < until)
    return conditions


def _events(conn: Connection, conditions: list[Any]) -> Iterator[Mapping[Any, Any]]:
    stmt = select(*PUBLIC_COLUMNS).where(*conditions).order_by(EVENTS.c.user_id, EVENTS.c.seq)
    result = conn.execute(stmt, execution_options={"yield_per": STREAM_BATCH})
    yield from result.mappings()


def _chain_heads(conn: Connection, conditions: list[Any]) -> Iterator[ChainHead]:
    """Per exported chain: how many of its events were exported, and its head right now."""
    stmt = (
        select(EVENTS.c.user_id, func.count().label("events"), HEADS.c.seq, HEADS.c.hash)
        .select_from(EVENTS.outerjoin(HEADS, HEADS.c.user_id == EVENTS.c.user_id))
        .where(*conditions)
        .group_by(EVENTS.c.user_id, HEADS.c.seq, HEADS.c.hash)
        .order_by(EVENTS.c.user_id)
    )
    for row in conn.execute(stmt, execution_options={"yield_per": STREAM_BATCH}):
        yield ChainHead(row.user_id, int(row.events), row.seq, row.hash)


def _event_record(row: Mapping[Any, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"record": "event"}
    for name in EVENT_FIELDS:
        value = row[name]
        record[name] = format_timestamp(value) if isinstance(value, datetime) else value
    return record


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _NdjsonWriter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def event(self, record: dict[str, Any]) -> None:
        self.out.write(_dumps(record) + "\n")

    def close(
        self, count: int, heads: Iterator[ChainHead], exported_at: str, filters: dict[str, Any]
    ) -> int:
        """One closing JSON object, written piecewise so that the chain list streams."""
        self.out.write('{"record":"end","count":' + str(count) + ',"chains":[')
        chains = 0
        for head in heads:
            self.out.write(("," if chains else "") + _dumps(asdict(head)))
            chains += 1
        tail = _dumps({"exported_at": exported_at, "filters": filters})
        self.out.write("]," + tail[1:] + "\n")
        return chains


class _CsvWriter:
    def __init__(self, out: TextIO) -> None:
        self.writer = csv.writer(out)
        self.writer.writerow(CSV_HEADER)

    def _row(self, kind: str, cells: dict[str, Any], count: Any = "") -> None:
        row = [kind, *(cells.get(name, "") for name in EVENT_FIELDS), count]
        self.writer.writerow([escape_cell(cell) for cell in row])

    def event(self, record: dict[str, Any]) -> None:
        cells = {
            name: "" if value is None else _dumps_sorted(value) if name in JSON_FIELDS else value
            for name, value in record.items()
        }
        self._row("event", cells)

    def close(
        self, count: int, heads: Iterator[ChainHead], exported_at: str, filters: dict[str, Any]
    ) -> int:
        """A `chain` row per chain, then the `end` row (the filters are not repeated)."""
        chains = 0
        for head in heads:
            cells = {"user_id": head.user_id, "seq": head.head_seq, "hash": head.head_hash}
            self._row("chain", {k: "" if v is None else v for k, v in cells.items()}, head.events)
            chains += 1
        self._row("end", {"occurred_at": exported_at}, count)
        return chains


def _dumps_sorted(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def export_events(
    conn: Connection,
    out: TextIO,
    fmt: ExportFormat,
    *,
    user_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ExportSummary:
    """Write the matching events (by user, then seq) and the closing record to `out`."""
    conditions = _filters(user_id, since, until)
    exported_at = conn.execute(select(func.now(type_=UTCDateTime))).scalar_one()
    writer = _CsvWriter(out) if fmt is ExportFormat.csv else _NdjsonWriter(out)
    count = 0
    for row in _events(conn, conditions):
        writer.event(_event_record(row))
        count += 1
    filters = {
        "user_id": user_id,
        "since": format_timestamp(since) if since else None,
        "until": format_timestamp(until) if until else None,
    }
    chains = writer.close(
        count, _chain_heads(conn, conditions), format_timestamp(exported_at), filters
    )
    return ExportSummary(count=count, chains=chains)


def read_anchors(path: Path) -> dict[str, Anchor]:
    """Each chain's head from an export's closing record (NDJSON or CSV)."""
    with path.open(encoding="utf-8", newline="") as file:
        first = file.read(1)
        file.seek(0)
        if first == "{":
            return _ndjson_anchors(file)
        return _csv_anchors(file)


def _anchor(user_id: Any, seq: Any, hash_: Any) -> tuple[str, Anchor] | None:
    if not user_id or seq in (None, "") or not hash_:
        return None  # a chain whose head row was missing at export time: nothing to hold to
    return str(user_id), Anchor(seq=int(seq), hash=str(hash_))


def _ndjson_anchors(file: TextIO) -> dict[str, Anchor]:
    last = ""
    for line in file:
        if line.strip():
            last = line
    try:
        closing = json.loads(last)
    except (ValueError, RecursionError):  # nested too deep for the parser
        raise ExportFileError("the last line is not JSON") from None
    if not isinstance(closing, dict) or closing.get("record") != "end":
        raise ExportFileError("no closing record: the export is incomplete")
    anchors: dict[str, Anchor] = {}
    try:
        for chain in closing["chains"]:
            pair = _anchor(chain["user_id"], chain["head_seq"], chain["head_hash"])
            if pair is not None:
                anchors[pair[0]] = pair[1]
    except (KeyError, TypeError, ValueError):
        raise ExportFileError("the closing record is malformed") from None
    return anchors


def _csv_anchors(file: TextIO) -> dict[str, Anchor]:
    reader = csv.DictReader(file)
    if reader.fieldnames is None or tuple(reader.fieldnames) != CSV_HEADER:
        raise ExportFileError("not an audit export (unexpected CSV header)")
    anchors: dict[str, Anchor] = {}
    ended = False
    try:
        for row in reader:
            if row["record"] == "chain":
                cells = (unescape_cell(row[name] or "") for name in ("user_id", "seq", "hash"))
                pair = _anchor(*cells)
                if pair is not None:
                    anchors[pair[0]] = pair[1]
            elif row["record"] == "end":
                ended = True
    except (csv.Error, ValueError):
        raise ExportFileError("the CSV is malformed") from None
    if not ended:
        raise ExportFileError("no closing record: the export is incomplete")
    return anchors
