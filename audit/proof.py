"""A user's proof that their chain head is in a signed checkpoint, and its independent check.

The proof (format `todo-api/audit-proof/v1`) holds the user's leaf (user_id, seq, hash), its
index, the RFC 9162 inclusion path (sibling hashes only: nothing of another user but hashes)
and the signed checkpoint without its leaves:

    {"format": "todo-api/audit-proof/v1", "user_id": ..., "seq": 12, "hash": "<64 hex>",
     "leaf_index": 3, "inclusion_path": ["<64 hex>", ...], "checkpoint": {...signed fields,
     "signature"}}

To verify it (`verify_proof`, usable without the server or the database): the checkpoint's
signature with a trusted public key for its `key_id`; the path from the leaf to the signed root;
and, given the user's own events (from the feed or an export), that they chain from seq 1 and
the event at `seq` has the proven hash, so the history up to it is the one that was signed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from audit import merkle
from audit.chain import GENESIS_HASH, HASHED_FIELDS, compute_hash
from audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    Leaf,
    latest_checkpoint_id,
    load_checkpoint,
    parse_head,
)
from audit.signing import PublicKey, key_ring

FORMAT = "todo-api/audit-proof/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ProofReport:
    ok: bool
    user_id: str | None
    seq: int | None
    checkpoint_created_at: str | None
    reason: str | None = None


class _Tree:
    """A checkpoint with its tree built, to answer every user's proof from it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.levels = merkle.tree_levels([leaf.leaf_hash() for leaf in checkpoint.leaves])

    def proof(self, user_id: str) -> dict[str, Any] | None:
        index = self.checkpoint.index_of(user_id)
        if index is None:
            return None
        return _proof(self.checkpoint, index, merkle.path_in(self.levels, index))


class LatestProofs:
    """Proofs from the latest stored checkpoint. Its tree is built once per process and
    checkpoint (stored checkpoints never change), not for every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tree: tuple[int, _Tree] | None = None

    def proof(self, session: Session, user_id: str) -> dict[str, Any] | None:
        latest = latest_checkpoint_id(session)
        if latest is None:
            return None
        cached = self._tree
        if cached is None or cached[0] != latest:
            cached = (latest, _Tree(load_checkpoint(session, latest)))
            with self._lock:
                if self._tree is None or self._tree[0] < latest:
                    self._tree = cached
        return cached[1].proof(user_id)


def _proof(checkpoint: Checkpoint, index: int, path: list[bytes]) -> dict[str, Any]:
    leaf = checkpoint.leaves[index]
    return {
        "format": FORMAT,
        "user_id": leaf.user_id,
        "seq": leaf.seq,
        "hash": leaf.hash,
        "leaf_index": index,
        "inclusion_path": [node.hex() for node in path],
        "checkpoint": checkpoint.head.as_dict(),
    }


def _check_events(events: Iterable[Mapping[str, Any]], user_id: str, seq: int, hash_: str) -> None:
    """The user's events, seq 1 upwards, link up and reach `hash_` at `seq`. Events that
    cannot be read or hashed fail the check, as a damaged proof does: they are input too."""
    try:
        ordered = sorted(events, key=lambda e: int(e["seq"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("an event has no integer `seq`") from None
    prev, expected = GENESIS_HASH, 1
    for event in ordered:
        if expected > seq:
            break
        try:
            _check_event(event, user_id, expected, prev)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            reason = f"seq {expected}: not an audit event that can be hashed ({exc!r})"
            raise CheckpointError(reason) from None
        prev, expected = event["hash"], expected + 1
    if expected <= seq:
        raise CheckpointError(f"the events end at seq {expected - 1}, before the proven seq {seq}")
    if prev != hash_:
        raise CheckpointError(
            f"seq {seq}: the events hash to another value than the signed checkpoint holds: "
            "the history up to it was rewritten"
        )


def _check_event(event: Mapping[str, Any], user_id: str, expected: int, prev: str) -> None:
    if event["user_id"] != user_id:
        raise CheckpointError(f"seq {event['seq']} belongs to another user")
    if int(event["seq"]) != expected:
        raise CheckpointError(f"seq {expected} is missing from the events")
    if event["prev_hash"] != prev:
        raise CheckpointError(f"seq {expected}: prev_hash does not link to seq {expected - 1}")
    version = event["hash_version"]
    if version not in HASHED_FIELDS or compute_hash(event, version) != event["hash"]:
        raise CheckpointError(f"seq {expected}: the event does not hash to its hash")


def verify_proof(
    proof: Any,
    keys: Iterable[PublicKey] | Mapping[str, PublicKey],
    events: Iterable[Mapping[str, Any]] | None = None,
) -> ProofReport:
    """Check a proof as a user or an auditor would, trusting only `keys`."""
    ring = keys if isinstance(keys, Mapping) else key_ring(keys)
    if not isinstance(proof, Mapping):
        return ProofReport(False, None, None, None, "a proof is a JSON object")
    user_id, seq, hash_ = proof.get("user_id"), proof.get("seq"), proof.get("hash")
    created_at = None
    try:
        if proof.get("format") != FORMAT:
            raise CheckpointError(f"`format` is not {FORMAT!r}")
        index, path = proof.get("leaf_index"), proof.get("inclusion_path")
        if (
            not isinstance(user_id, str)
            or not isinstance(seq, int)
            or not isinstance(hash_, str)
            or not _HEX64.fullmatch(hash_)
            or not isinstance(index, int)
            or not isinstance(path, list)
            or not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in path)
        ):
            raise CheckpointError("the proof's leaf, index or path is malformed")
        head = parse_head(proof.get("checkpoint"))
        created_at = head.created_at
        head.verify_signature(ring)
        leaf = Leaf(user_id, seq, hash_).leaf_hash()
        nodes = [bytes.fromhex(p) for p in path]
        if merkle.root_from_path(leaf, index, head.tree_size, nodes).hex() != head.root_hash:
            raise CheckpointError("the inclusion path does not lead to the signed root")
        if events is not None:
            _check_events(events, user_id, seq, hash_)
    except (CheckpointError, merkle.ProofError) as exc:
        return ProofReport(
            False,
            user_id if isinstance(user_id, str) else None,
            seq if isinstance(seq, int) else None,
            created_at,
            str(exc),
        )
    return ProofReport(True, user_id, seq, created_at)
