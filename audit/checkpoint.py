"""Signed checkpoints: every chain head at one moment, in an RFC 9162 Merkle tree, signed.

The hash chains show that no event was edited in place; they cannot show that someone able to
switch the triggers off did not rewrite a chain and recompute every later hash. A checkpoint
kept outside the database can: each user's head (seq, hash) is a leaf, so a rewrite of any
event at or before that head changes the hash at that seq, and a deleted tail loses the seq.

A checkpoint is one JSON document (format `todo-api/audit-checkpoint/v1`):

    {"format": "todo-api/audit-checkpoint/v1",
     "created_at": "2026-12-04T15:00:00.123456Z",   database clock, UTC
     "tree_size": 2,                                number of leaves
     "root_hash": "<64 hex>",                        RFC 9162 Merkle Tree Hash of the leaves
     "previous_root_hash": "<64 hex>" | null,        root of the checkpoint made before this one
     "key_id": "<32 hex>",                           SHA-256(raw Ed25519 public key)[:16]
     "signature": "<base64>",                        Ed25519 over the signed statement
     "leaves": [["user_id", head_seq, "head_hash"], ...]}   in user-id (code point) order

The signed statement is the compact JSON (sorted keys, UTF-8) of the object made of the six
fields `format`, `created_at`, `tree_size`, `root_hash`, `previous_root_hash` and `key_id`. The
leaves are bound to it through the root: leaf i's data is the compact JSON array
`["user_id",seq,"hash"]` in UTF-8, hashed as SHA-256(0x00 || data).

Making one reads only the chain-head rows (one per user) and the previous checkpoint, never the
events. A head that went back since the previous checkpoint is logged as an error at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, insert, select, text
from sqlalchemy.orm import Session

from audit import merkle
from audit.chain import format_timestamp
from audit.files import write_complete_file
from audit.models import CHECKPOINTS, HEADS
from audit.signing import KeyFormatError, PublicKey, SigningKey, load_signing_key
from audit.signing import load_signing_key_file as _load_key_file
from service.database import Database
from service.settings import ConfigError, Settings
from service.sqltypes import UTCDateTime

FORMAT = "todo-api/audit-checkpoint/v1"
# pg_advisory_xact_lock key: checkpoint makers take turns, so each links to the one before.
LOCK_KEY = 0x746F646F_61756474  # "todoaudt"
ALERTS_MAX = 20
SIGNED_FIELDS = ("format", "created_at", "tree_size", "root_hash", "previous_root_hash", "key_id")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{1,64}")
log = logging.getLogger("audit.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that is malformed, or whose signature or root does not verify."""


@dataclass(frozen=True, slots=True, order=True)
class Leaf:
    """One user's chain head as a checkpoint recorded it."""

    user_id: str
    seq: int
    hash: str

    def data(self) -> bytes:
        return _encode_leaf([self.user_id, self.seq, self.hash]).encode("utf-8")

    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.data())


@dataclass(frozen=True, slots=True)
class CheckpointHead:
    """The signed part of a checkpoint and its signature (what a proof carries)."""

    created_at: str
    tree_size: int
    root_hash: str
    previous_root_hash: str | None
    key_id: str
    signature: str

    def statement(self) -> bytes:
        return signed_statement(
            self.created_at, self.tree_size, self.root_hash, self.previous_root_hash, self.key_id
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created_at": self.created_at,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "previous_root_hash": self.previous_root_hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def verify_signature(self, keys: Mapping[str, PublicKey]) -> None:
        key = keys.get(self.key_id)
        if key is None:
            raise CheckpointError(
                f"signed with key {self.key_id}, which is not among the trusted public keys"
            )
        if not key.verify(base64.b64decode(self.signature), self.statement()):
            raise CheckpointError(f"the signature does not verify with key {self.key_id}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    head: CheckpointHead
    leaves: tuple[Leaf, ...] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {**self.head.as_dict(), "leaves": [[x.user_id, x.seq, x.hash] for x in self.leaves]}

    def to_json(self) -> str:
        return _compact(self.as_dict()) + "\n"

    def verify(self, keys: Mapping[str, PublicKey]) -> None:
        """Signature by a trusted key, then the leaves against the signed root."""
        self.head.verify_signature(keys)
        if merkle.root([leaf.leaf_hash() for leaf in self.leaves]).hex() != self.head.root_hash:
            raise CheckpointError("the leaves do not hash to the signed root")

    def index_of(self, user_id: str) -> int | None:
        """The position of a user's leaf (leaves are sorted by user id), or None."""
        lo, hi = 0, len(self.leaves)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.leaves[mid].user_id < user_id:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self.leaves) and self.leaves[lo].user_id == user_id else None


# Compact JSON of [user_id, seq, hash]; one encoder, built once (a checkpoint encodes a leaf
# per user).
_encode_leaf = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signed_statement(
    created_at: str, tree_size: int, root_hash: str, previous_root_hash: str | None, key_id: str
) -> bytes:
    values = (FORMAT, created_at, tree_size, root_hash, previous_root_hash, key_id)
    return _compact(dict(zip(SIGNED_FIELDS, values, strict=True))).encode("utf-8")


# --- reading untrusted documents ---------------------------------------------------------


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"`{name}` is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _hex64(doc: Mapping[str, Any], name: str, nullable: bool = False) -> Any:
    value = doc.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise CheckpointError(f"`{name}` is not a 64-character lowercase hex hash")
    return value


def parse_head(doc: Any) -> CheckpointHead:
    if not isinstance(doc, Mapping):
        raise CheckpointError("a checkpoint is a JSON object")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"`format` is not {FORMAT!r}")
    created_at = _field(doc, "created_at", str)
    try:
        parsed = datetime.fromisoformat(created_at)
    except ValueError:
        raise CheckpointError("`created_at` is not an ISO 8601 time") from None
    if parsed.tzinfo is None or format_timestamp(parsed) != created_at:
        raise CheckpointError("`created_at` is not in the checkpoint's UTC format")
    tree_size = _field(doc, "tree_size", int)
    if tree_size < 0:
        raise CheckpointError("`tree_size` is negative")
    key_id = _field(doc, "key_id", str)
    if not _KEY_ID.fullmatch(key_id):
        raise CheckpointError("`key_id` is not hex")
    signature = _field(doc, "signature", str)
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    # Only the one text of those bytes: decoding ignores the last character's spare bits, so
    # a file altered there would still verify.
    if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != signature:
        raise CheckpointError("`signature` is not a base64 Ed25519 signature")
    return CheckpointHead(
        created_at=created_at,
        tree_size=tree_size,
        root_hash=_hex64(doc, "root_hash"),
        previous_root_hash=_hex64(doc, "previous_root_hash", nullable=True),
        key_id=key_id,
        signature=signature,
    )


def _parse_leaf(item: Any) -> Leaf:
    if (
        not isinstance(item, list)
        or len(item) != 3
        or not isinstance(item[0], str)
        or not item[0]
        or not isinstance(item[1], int)
        or isinstance(item[1], bool)
        or item[1] < 1
        or not isinstance(item[2], str)
        or not _HEX64.fullmatch(item[2])
    ):
        raise CheckpointError(f"a leaf is not [user_id, seq >= 1, hash]: {str(item)[:200]}")
    return Leaf(item[0], item[1], item[2])


def parse_checkpoint(doc: Any) -> Checkpoint:
    """A checkpoint document's fields, checked for shape (not yet for signature or root)."""
    head = parse_head(doc)
    items = doc.get("leaves")
    if not isinstance(items, list):
        raise CheckpointError("`leaves` is missing or not a list")
    leaves = tuple(_parse_leaf(item) for item in items)
    if len(leaves) != head.tree_size:
        raise CheckpointError(f"`tree_size` is {head.tree_size} but there are {len(leaves)} leaves")
    for before, after in itertools.pairwise(leaves):
        if not before.user_id < after.user_id:
            raise CheckpointError(f"leaves are not in strict user-id order at {after.user_id!r}")
    return Checkpoint(head, leaves)


def load_checkpoint_json(data: bytes) -> Checkpoint:
    """A checkpoint file's content (UTF-8 JSON), checked for shape."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too; nested too deep
        raise CheckpointError(f"cannot read it as JSON: {exc}") from None
    return parse_checkpoint(doc)


def read_checkpoint_file(path: Path) -> Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read it: {exc}") from None
    return load_checkpoint_json(data)


def successor_problems(earlier: Checkpoint, later: Checkpoint) -> Iterator[tuple[str, str]]:
    """(user_id, reason) for each chain the later checkpoint does not extend: a user gone, a
    head at a lower seq (a truncated history), or another hash at the same seq."""
    heads = {leaf.user_id: leaf for leaf in later.leaves}
    then, now = earlier.head.created_at, later.head.created_at
    for old in earlier.leaves:
        new = heads.get(old.user_id)
        if new is None:
            yield old.user_id, f"at seq {old.seq} in the checkpoint of {then}, absent from {now}'s"
        elif new.seq < old.seq:
            yield (
                old.user_id,
                f"head went back from seq {old.seq} ({then}) to seq {new.seq} ({now}): "
                "the history was truncated",
            )
        elif new.seq == old.seq and new.hash != old.hash:
            yield old.user_id, f"seq {old.seq} has another hash at {now} than at {then}"


# --- making checkpoints ------------------------------------------------------------------


def sign_leaves(
    key: SigningKey,
    leaves: Sequence[Leaf],
    created_at: datetime,
    previous_root_hash: str | None,
) -> Checkpoint:
    ordered = tuple(sorted(leaves))
    root_hash = merkle.root([leaf.leaf_hash() for leaf in ordered]).hex()
    stamp = format_timestamp(created_at)
    statement = signed_statement(stamp, len(ordered), root_hash, previous_root_hash, key.key_id)
    head = CheckpointHead(
        created_at=stamp,
        tree_size=len(ordered),
        root_hash=root_hash,
        previous_root_hash=previous_root_hash,
        key_id=key.key_id,
        signature=base64.b64encode(key.sign(statement)).decode("ascii"),
    )
    return Checkpoint(head, ordered)


def interval_start_of(moment: datetime, interval_seconds: int) -> datetime:
    epoch = int(moment.timestamp()) // interval_seconds * interval_seconds
    return datetime.fromtimestamp(epoch, UTC)


def make_checkpoint(
    session: Session, key: SigningKey, *, interval_seconds: int = 0
) -> Checkpoint | None:
    """Sign the current chain heads and add the checkpoint to the session (flushed, not
    committed: the caller's unit of work commits).

    With `interval_seconds`, a periodic checkpoint: None if the current interval (by the
    database clock) already has one. Makers take turns on an advisory lock held until commit,
    and a unique index on the interval is the last word.
    """
    # Signing a million chains' tree is seconds of Python inside this transaction, which holds
    # no row lock: not a frozen client (DB_IDLE_IN_TRANSACTION_TIMEOUT_MS).
    session.execute(
        text(
            "SELECT pg_advisory_xact_lock(:key), "
            "set_config('idle_in_transaction_session_timeout', '0', true)"
        ),
        {"key": LOCK_KEY},
    )
    now = session.execute(select(func.clock_timestamp(type_=UTCDateTime))).scalar_one()
    interval_start = None
    if interval_seconds:
        interval_start = interval_start_of(now, interval_seconds)
        taken = exists().where(CHECKPOINTS.c.interval_start == interval_start)
        if session.execute(select(taken)).scalar():
            return None
    previous = _previous_checkpoint(session)
    rows = session.execute(select(HEADS.c.user_id, HEADS.c.seq, HEADS.c.hash))
    leaves = [Leaf(r[0], int(r[1]), r[2]) for r in rows]
    checkpoint = sign_leaves(key, leaves, now, previous.head.root_hash if previous else None)
    if previous is not None:
        _alert_on_regressions(previous, checkpoint)
    head = checkpoint.head
    session.execute(
        insert(CHECKPOINTS).values(
            created_at=now,
            interval_start=interval_start,
            tree_size=head.tree_size,
            root_hash=head.root_hash,
            previous_root_hash=head.previous_root_hash,
            key_id=head.key_id,
            signature=head.signature,
            leaves=checkpoint.as_dict()["leaves"],
        )
    )
    return checkpoint


def _alert_on_regressions(previous: Checkpoint, checkpoint: Checkpoint) -> None:
    """An early alarm: a chain that went back since the previous stored checkpoint was
    truncated or rewritten in the database. The new checkpoint is signed all the same (it
    records what is there); `audit verify --checkpoint` with the kept files is the proof."""
    problems = list(successor_problems(previous, checkpoint))
    for user_id, reason in problems[:ALERTS_MAX]:
        log.error(
            "audit chain does not extend the previous checkpoint",
            extra={"user_id": user_id, "reason": reason},
        )
    if len(problems) > ALERTS_MAX:
        log.error(
            "audit chains that do not extend the previous checkpoint",
            extra={"count": len(problems)},
        )


def latest_checkpoint_id(session: Session) -> int | None:
    stmt = select(CHECKPOINTS.c.id).order_by(CHECKPOINTS.c.id.desc()).limit(1)
    found = session.execute(stmt).scalar()
    return None if found is None else int(found)


def load_checkpoint(session: Session, checkpoint_id: int) -> Checkpoint:
    row = session.execute(select(CHECKPOINTS).where(CHECKPOINTS.c.id == checkpoint_id)).one()
    head = CheckpointHead(
        created_at=format_timestamp(row.created_at),
        tree_size=int(row.tree_size),
        root_hash=row.root_hash,
        previous_root_hash=row.previous_root_hash,
        key_id=row.key_id,
        signature=row.signature,
    )
    try:
        leaves = tuple(Leaf(u, int(s), h) for u, s, h in row.leaves)
    except (TypeError, ValueError) as exc:  # a row written by hand: the table is no evidence
        reason = f"stored checkpoint {checkpoint_id} has unreadable leaves ({exc})"
        raise CheckpointError(reason) from None
    return Checkpoint(head, leaves)


def _previous_checkpoint(session: Session) -> Checkpoint | None:
    """The latest stored checkpoint, to link to and compare with; None if there is none or it
    cannot be read (logged): a row written by hand must not stop every later checkpoint."""
    previous_id = latest_checkpoint_id(session)
    if previous_id is None:
        return None
    try:
        return load_checkpoint(session, previous_id)
    except CheckpointError as exc:
        log.error(
            "the previous stored checkpoint cannot be read: nothing to link to or compare with",
            extra={"checkpoint_id": previous_id, "reason": str(exc)},
        )
        return None


def signing_key(settings: Settings) -> SigningKey | None:
    """The configured signing key, or None; a configured but unusable key is a ConfigError."""
    try:
        if settings.audit_signing_key is not None:
            return load_signing_key(settings.audit_signing_key.get_secret_value())
        if settings.audit_signing_key_file is not None:
            return _load_key_file(settings.audit_signing_key_file)
    except KeyFormatError as exc:
        raise ConfigError(f"the audit signing key is unusable: {exc}") from None
    return None


def check_checkpoint_dir(settings: Settings) -> None:
    """AUDIT_CHECKPOINT_DIR, when the periodic maker will write into it, is a directory this
    process may write: else the service started as if all was well, and each checkpoint's
    copy was an ERROR line, from the first interval on."""
    directory = settings.audit_checkpoint_dir
    if directory is None or not settings.audit_checkpoint_interval_seconds:
        return
    if not directory.is_dir():
        raise ConfigError(f"AUDIT_CHECKPOINT_DIR={directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"AUDIT_CHECKPOINT_DIR={directory} is not writable by this process")


def file_name(checkpoint: Checkpoint) -> str:
    stamp = re.sub(r"[^0-9TZ]", "", checkpoint.head.created_at)
    return f"checkpoint-{stamp}-{checkpoint.head.root_hash[:12]}.json"


class PeriodicCheckpoints:
    """One checkpoint per interval, whichever instance gets there first; the others find the
    interval taken. Also copies each one it makes into `directory`, if given."""

    def __init__(
        self, db: Database, key: SigningKey, interval_seconds: int, directory: Path | None = None
    ) -> None:
        self.db = db
        self.key = key
        self.interval = interval_seconds
        self.directory = directory

    def run_once(self) -> Checkpoint | None:
        with self.db.unit_of_work() as session:
            checkpoint = make_checkpoint(session, self.key, interval_seconds=self.interval)
        if checkpoint is not None:
            if self.directory is not None:
                path = self.directory / file_name(checkpoint)
                try:
                    write_complete_file(path, checkpoint.to_json())
                except OSError as exc:
                    # Stored and signed all the same; `audit checkpoint` can write the next.
                    log.error(
                        "audit checkpoint stored but not written to AUDIT_CHECKPOINT_DIR",
                        extra={"path": str(path), "error": str(exc)},
                    )
            log.info(
                "audit checkpoint made",
                extra={
                    "created_at": checkpoint.head.created_at,
                    "tree_size": checkpoint.head.tree_size,
                    "root_hash": checkpoint.head.root_hash,
                    "key_id": checkpoint.head.key_id,
                },
            )
        return checkpoint

    def seconds_to_next_interval(self) -> float:
        # A little random spread keeps instances from all asking at the same instant.
        now = time.time()
        wait = self.interval - now % self.interval
        return wait + random.uniform(0, min(5.0, self.interval / 10))  # noqa: S311

    async def run(self) -> None:
        """Forever: a checkpoint for the current interval if none exists, then wait."""
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:
                log.exception("audit checkpoint failed; retrying next interval")
            await asyncio.sleep(self.seconds_to_next_interval())
