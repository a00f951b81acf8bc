"""`todo-api audit verify|export|checkpoint|public-key`: the operators' side of the audit trail.

verify prints, with `--checkpoint`, one `{"record": "checkpoint", "file", "ok", "created_at",
"tree_size", "key_id", "reason"}` line per file and a `{"record": "succession", "earlier",
"later", "user_id", "reason"}` line per chain that a later checkpoint does not extend; then one
JSON line per chain (`{"record": "chain", "user_id", "ok", "events", "head_seq", "head_hash",
"first_bad_seq", "reason", "verified_from_seq"}`) and a closing `{"record": "summary", ...}`
line. Exit status: 0 everything verifies, 1 something does not (a chain, or a checkpoint
file's content), or an export's or checkpoint's `--output` could not be written, 2 bad
usage or configuration (an input file that cannot be read, or an export that is not one), 3
the database is unreachable, not migrated or failed the command. 2 and 3 are one line on
stderr, said by `service.cli.run` for every command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection, select, text

from audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint_json,
    make_checkpoint,
    signing_key,
    successor_problems,
)
from audit.checkpoint import log as checkpoint_log
from audit.files import complete_file, write_complete_file
from audit.schemas import round_up_to_microsecond
from audit.signing import KeyFormatError, PublicKey, key_ring, parse_public_keys
from audit.verify import Anchor, snapshot, verify_all, verify_chain
from service.database import UNTIMED_TRANSACTION, Database
from service.limits import USER_ID_MAX
from service.settings import Settings
from service.text import is_utf8
from service.users import USERS

# `audit.export` (and FastAPI, through it) is imported when a command runs, so that
# `todo-api --help` and the other commands start without it.
FORMATS = ("ndjson", "csv")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3


class UsageError(Exception):
    """A command given something it cannot use, such as an input file that is missing or not
    what it should be: one line and exit 2 (`service.cli.run`), never 1, which says that the
    audit trail did not verify."""


def read_input(path: Path) -> bytes:
    """An input file's content; one that cannot be read is a usage error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def aware_datetime(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time with a zone; a naive one would be guessed, so it is refused.
    Both uses (`--since`, inclusive; `--until`, exclusive) round it up to the microsecond."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone; add one, e.g. 2026-11-24T10:00:00Z"
        )
    try:
        return round_up_to_microsecond(text, value.astimezone(UTC))
    except (OverflowError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range in UTC") from None


def user_id_arg(text: str) -> str:
    """A user whose stored data is read: any id the database can hold, not only those the API
    serves now (`service.text`), so that a user created under an older rule can still be read,
    verified and exported."""
    if not 1 <= len(text) <= USER_ID_MAX or "\x00" in text or not is_utf8(text):
        raise argparse.ArgumentTypeError(
            f"a user id is 1 to {USER_ID_MAX} characters of UTF-8 text, without NUL"
        )
    return text


@contextmanager
def _snapshot(settings: Settings) -> Iterator[Connection]:
    """A read-only snapshot of the whole database, for one consistent verify or export."""
    db = Database.from_settings(settings)
    try:
        with db.sessionmaker() as session:
            conn = snapshot(session)
            # Reading every chain takes longer than a request may, and an export waits on its
            # reader between batches (`| less`): not a frozen client. Neither bound applies.
            conn.execute(text(UNTIMED_TRANSACTION))
            yield conn
            session.rollback()
    finally:
        db.dispose()


def _print(record: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _trusted_keys(paths: list[Path], settings: Settings) -> dict[str, PublicKey]:
    """The public keys given as files, and the configured signing key's own."""
    keys: list[PublicKey] = []
    for path in paths:
        try:
            keys.extend(parse_public_keys(read_input(path).decode("utf-8")))
        except (UnicodeDecodeError, KeyFormatError) as exc:
            raise UsageError(f"cannot use {path} as a public key: {exc}") from None
    configured = signing_key(settings)
    if configured is not None:
        keys.append(configured.public)
    return key_ring(keys)


def _check_checkpoints(
    files: list[tuple[Path, bytes]], keys: dict[str, PublicKey], out: TextIO
) -> tuple[list[Checkpoint], int]:
    """Each file's signature and root, then each later checkpoint against the earlier one.
    Returns the checkpoints that verify (oldest first) and the number of failures: a file
    read but malformed is one, as a checkpoint altered on its way here would be."""
    good: list[tuple[Checkpoint, Path]] = []
    failures = 0
    for path, data in files:
        record: dict[str, Any] = {"record": "checkpoint", "file": str(path), "ok": False}
        try:
            checkpoint = load_checkpoint_json(data)
            record |= {
                "created_at": checkpoint.head.created_at,
                "tree_size": checkpoint.head.tree_size,
                "key_id": checkpoint.head.key_id,
            }
            checkpoint.verify(keys)
        except CheckpointError as exc:
            failures += 1
            _print({**record, "reason": str(exc)}, out)
            continue
        good.append((checkpoint, path))
        _print({**record, "ok": True, "reason": None}, out)
    good.sort(key=lambda pair: pair[0].head.created_at)
    for (earlier, earlier_path), (later, later_path) in itertools.pairwise(good):
        for user_id, reason in successor_problems(earlier, later):
            failures += 1
            record = {"record": "succession", "earlier": str(earlier_path)}
            _print({**record, "later": str(later_path), "user_id": user_id, "reason": reason}, out)
    return [checkpoint for checkpoint, _ in good], failures


def _checkpoint_anchors(checkpoints: list[Checkpoint]) -> dict[str, list[Anchor]]:
    anchors: dict[str, list[Anchor]] = {}
    for checkpoint in checkpoints:
        source = f"the checkpoint of {checkpoint.head.created_at}"
        for leaf in checkpoint.leaves:
            anchors.setdefault(leaf.user_id, []).append(Anchor(leaf.seq, leaf.hash, source))
    return anchors


def _user_exists(conn: Connection, user_id: str) -> bool:
    """Whether the service has seen this user's token (a user who only read has no chain)."""
    return conn.execute(select(USERS.c.id).where(USERS.c.id == user_id)).first() is not None


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from audit.export import ExportFileError, read_anchors

    # Every input file is read before anything is printed: one that cannot be used is a
    # usage error, not a finding.
    anchors: dict[str, list[Anchor]] = {}
    if args.against is not None:
        try:
            exported = read_anchors(args.against)
        except OSError as exc:
            raise UsageError(f"cannot read {args.against}: {exc.strerror or exc}") from None
        except (ExportFileError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot use {args.against} as an export: {exc}") from None
        anchors = {user_id: [anchor] for user_id, anchor in exported.items()}
    failed_checkpoints = 0
    if args.checkpoint:
        keys = _trusted_keys(args.public_key, settings)
        if not keys:
            print(
                "todo-api: --checkpoint needs the public keys: --public-key FILE, or "
                "AUDIT_SIGNING_KEY(_FILE) configured",
                file=sys.stderr,
            )
            return EXIT_USAGE
        files = [(path, read_input(path)) for path in args.checkpoint]
        checkpoints, failed_checkpoints = _check_checkpoints(files, keys, sys.stdout)
        for user_id, found in _checkpoint_anchors(checkpoints).items():
            anchors.setdefault(user_id, []).extend(found)
    chains = events = failed = 0
    with _snapshot(settings) as conn:
        if args.user is not None:
            found = anchors.get(args.user, [])
            report = verify_chain(conn, args.user, anchors=found)
            if report.ok and not report.events and not _user_exists(conn, args.user):
                # Else a mistyped id would read as an intact chain.
                print(f"todo-api: no user {args.user!r} and no audit chain", file=sys.stderr)
                return EXIT_USAGE
            reports = iter([report])
        else:
            reports = verify_all(conn, anchors=anchors)
        for report in reports:
            chains += 1
            events += report.events
            failed += not report.ok
            if not (args.failures_only and report.ok):
                _print({"record": "chain", **report.as_dict()}, sys.stdout)
    ok = not failed and not failed_checkpoints
    summary = {"record": "summary", "ok": ok, "chains": chains, "events": events}
    if args.checkpoint:
        summary["checkpoint_failures"] = failed_checkpoints
    _print({**summary, "failed": failed}, sys.stdout)
    return EXIT_OK if ok else EXIT_FAILED


class _StderrAlarms(logging.Handler):
    """The checkpoint maker's alarms (a chain that does not extend the previous checkpoint, a
    previous one that cannot be read) as lines on stderr with what they say in their fields,
    as the service's log lines do:
    the command configures no logging, and Python's last resort printed the message alone,
    without the user or the reason. stdout is the checkpoint's."""

    def emit(self, record: logging.LogRecord) -> None:
        fields = {
            name: value
            for name in ("user_id", "checkpoint_id", "reason", "count")
            if (value := getattr(record, name, None)) is not None
        }
        sys.stderr.write(
            f"todo-api: {record.getMessage()}: {json.dumps(fields, ensure_ascii=False)}\n"
        )


def _make_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    key = signing_key(settings)
    if key is None:
        print(
            "todo-api: checkpoints are signed: set AUDIT_SIGNING_KEY or AUDIT_SIGNING_KEY_FILE",
            file=sys.stderr,
        )
        return EXIT_USAGE
    db = Database.from_settings(settings)
    alarms = _StderrAlarms(logging.ERROR)
    checkpoint_log.addHandler(alarms)
    try:
        with db.unit_of_work() as session:
            checkpoint = make_checkpoint(session, key)
    finally:
        checkpoint_log.removeHandler(alarms)
        db.dispose()
    assert checkpoint is not None  # only a periodic checkpoint can find its interval taken
    if args.output is None:
        sys.stdout.write(checkpoint.to_json())
    else:
        try:
            write_complete_file(args.output, checkpoint.to_json())
        except OSError as exc:
            print(f"todo-api: the checkpoint is stored but not written: {exc}", file=sys.stderr)
            return EXIT_FAILED
    head = checkpoint.head
    print(
        f"Checkpoint of {head.tree_size} chains at {head.created_at}: root {head.root_hash}, "
        f"key {head.key_id}, written to {args.output or 'stdout'}",
        file=sys.stderr,
    )
    return EXIT_OK


def _public_key(args: argparse.Namespace, settings: Settings) -> int:
    key = signing_key(settings)
    if key is None:
        print("todo-api: set AUDIT_SIGNING_KEY or AUDIT_SIGNING_KEY_FILE", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "jwks":
        _print({"keys": [key.public.jwk()]}, sys.stdout)
    else:
        sys.stdout.write(key.public.pem())
    print(f"key id: {key.key_id}", file=sys.stderr)
    return EXIT_OK


@contextmanager
def _output(path: Path | None, csv: bool) -> Iterator[TextIO]:
    """stdout, or a file that appears only once complete (`audit.files`). stdout is flushed
    at the end: a reader gone is found before "Exported ..." is said."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with complete_file(path, newline="" if csv else None) as out:
        yield out


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
    except BrokenPipeError:
        raise  # stdout's reader is gone: not a failure to report (`service.cli.run`)
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
    """Add the `audit` commands to the `todo-api` parser."""
    audit = subparsers.add_parser("audit", help="verify, export or checkpoint the audit trail")
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
        "--checkpoint",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="also check these checkpoint files (signature, root, succession) and that every "
        "chain still has the heads they recorded",
    )
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a trusted public key (PEM or JWK set) for --checkpoint; repeat for old keys. "
        "The configured signing key's is always trusted",
    )
    verify.add_argument(
        "--failures-only", action="store_true", help="print only the chains that fail"
    )
    verify.set_defaults(handler=_verify)

    checkpoint = commands.add_parser(
        "checkpoint", help="sign every chain head now; store it and write it out"
    )
    checkpoint.add_argument("--output", type=Path, help="write to this file instead of stdout")
    checkpoint.set_defaults(handler=_make_checkpoint)

    public_key = commands.add_parser(
        "public-key", help="print the public key that verifies checkpoints"
    )
    public_key.add_argument("--format", choices=("pem", "jwks"), default="pem")
    public_key.set_defaults(handler=_public_key, needs_database=False)

    export = commands.add_parser(
        "export", help="write events and a closing record of each chain's head"
    )
    export.add_argument("--user", type=user_id_arg, help="only this user's events")
    export.add_argument("--since", type=aware_datetime, help="events at or after this time")
    export.add_argument("--until", type=aware_datetime, help="events before this time")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--output", type=Path, help="write to this file instead of stdout")
    export.set_defaults(handler=_export)
