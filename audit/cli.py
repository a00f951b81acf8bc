"""`todo-api audit verify|export`: the operators' side of the audit trail.

verify prints one JSON line per chain (`{"record": "chain", "user_id", "ok", "events",
"head_seq", "head_hash", "first_bad_seq", "reason"}`) and a closing `{"record": "summary", ...}`
line. Exit status: 0 every chain verifies, 1 a chain does not (or the export file is unusable),
2 bad usage, 3 the database is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from audit.verify import snapshot, verify_all, verify_chain
from service.database import Database
from service.models import USER_ID_MAX
from service.settings import Settings

# `audit.export` (and FastAPI, through it) is imported when a command runs, so that
# `todo-api --help` and the other commands start without it.
FORMATS = ("ndjson", "csv")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3


def aware_datetime(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time with a zone; a naive one would be guessed, so it is refused."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone; add one, e.g. 2026-11-24T10:00:00Z"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range in UTC") from None


def user_id_arg(text: str) -> str:
    if not 1 <= len(text) <= USER_ID_MAX or "\x00" in text:
        raise argparse.ArgumentTypeError(f"a user id is 1 to {USER_ID_MAX} characters")
    return text


@contextmanager
def _snapshot(settings: Settings) -> Iterator[Connection]:
    """A read-only snapshot of the whole database, for one consistent verify or export."""
    db = Database.from_settings(settings)
    try:
        with db.sessionmaker() as session:
            yield snapshot(session)
            session.rollback()
    finally:
        db.dispose()


def _print(record: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from audit.export import ExportFileError, read_anchors

    anchors = None
    if args.against is not None:
        try:
            anchors = read_anchors(args.against)
        except (OSError, ExportFileError, UnicodeDecodeError) as exc:
            print(f"todo-api: cannot use {args.against} as an export: {exc}", file=sys.stderr)
            return EXIT_FAILED
    chains = events = failed = 0
    try:
        with _snapshot(settings) as conn:
            if args.user is not None:
                anchor = anchors.get(args.user) if anchors else None
                reports = iter([verify_chain(conn, args.user, anchor=anchor)])
            else:
                reports = verify_all(conn, anchors=anchors)
            for report in reports:
                chains += 1
                events += report.events
                failed += not report.ok
                if not (args.failures_only and report.ok):
                    _print({"record": "chain", **report.as_dict()}, sys.stdout)
    except OperationalError as exc:
        print(f"todo-api: the database is unreachable: {exc.orig}", file=sys.stderr)
        return EXIT_DATABASE
    summary = {"record": "summary", "ok": not failed, "chains": chains, "events": events}
    _print({**summary, "failed": failed}, sys.stdout)
    return EXIT_FAILED if failed else EXIT_OK


@contextmanager
def _output(path: Path | None, csv: bool) -> Iterator[TextIO]:
    """stdout, or a file that appears only once complete (written aside, then renamed)."""
    if path is None:
        yield sys.stdout
        return
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="" if csv else None) as f:
            yield f
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from audit.export import ExportFormat, export_events

    if args.since and args.until and args.since >= args.until:
        print("todo-api: --since must be earlier than --until", file=sys.stderr)
        return EXIT_USAGE
    fmt = ExportFormat(args.format)
    try:
        with _snapshot(settings) as conn, _output(args.output, fmt is ExportFormat.csv) as out:
            summary = export_events(
                conn, out, fmt, user_id=args.user, since=args.since, until=args.until
            )
    except OperationalError as exc:
        print(f"todo-api: the database is unreachable: {exc.orig}", file=sys.stderr)
        return EXIT_DATABASE
    except OSError as exc:
        print(f"todo-api: cannot write the export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    where = args.output or "stdout"
    print(
        f"Exported {summary.count} events of {summary.chains} chains to {where}",
        file=sys.stderr,
    )
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add `audit verify` and `audit export` to the `todo-api` parser."""
    audit = subparsers.add_parser("audit", help="verify or export the audit trail")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser(
        "verify",
        help="recompute every hash chain (or one user's); exit 1 if any does not verify",
    )
    verify.add_argument("--user", type=user_id_arg, help="only this user's chain")
    verify.add_argument(
        "--against",
        type=Path,
        metavar="EXPORT",
        help="also check that each chain head recorded in this export is still in the chain",
    )
    verify.add_argument(
        "--failures-only", action="store_true", help="print only the chains that fail"
    )
    verify.set_defaults(handler=_verify)

    export = commands.add_parser(
        "export", help="write events and a closing record of each chain's head"
    )
    export.add_argument("--user", type=user_id_arg, help="only this user's events")
    export.add_argument("--since", type=aware_datetime, help="events at or after this time")
    export.add_argument("--until", type=aware_datetime, help="events before this time")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--output", type=Path, help="write to this file instead of stdout")
    export.set_defaults(handler=_export)
