"""Signed checkpoints against a superuser who rewrites the audit log (PostgreSQL).

Each test gets a database of its own: the tampering below would break `audit verify` for every
other test, and the whole-database verify is what an operator runs. The tamperer disables the
triggers, rewrites a chain and recomputes every later hash with the project's own function, so
that plain `audit verify` passes (each test shows it passing); a checkpoint file kept outside
the database still catches it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from audit.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    PeriodicCheckpoints,
    make_checkpoint,
    read_checkpoint_file,
    signing_key,
)
from audit.signing import SigningKey, parse_public_keys
from service.app import create_app
from service.database import Database
from service.settings import ConfigError, Settings
from tests.audit_helpers import events_of, json_lines, tampering
from tests.checkpoint_helpers import (
    KEY,
    World,
    checkpoint_world,
    extend_chain,
    make_chain,
    rehash,
    with_key,
)


@pytest.fixture
def world(base_settings: Settings, tmp_path: Path) -> Iterator[World]:
    with checkpoint_world(base_settings, tmp_path) as made:
        yield made


def chains(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["user_id"]: r for r in records if r["record"] == "chain"}


def assert_plain_verify_passes(world: World) -> None:
    status, records = world.verify()
    assert status == 0, records
    assert all(r["ok"] for r in records), records


def assert_caught(world: World, files: list[Path], user_id: str, seq: int) -> dict[str, Any]:
    """verify --checkpoint fails, naming this user and seq (and no other chain)."""
    status, records = world.verify("--checkpoint", *map(str, files))
    assert status == 1
    assert all(r["ok"] for r in records if r["record"] == "checkpoint"), records
    bad = [r for r in records if r["record"] == "chain" and not r["ok"]]
    assert [(r["user_id"], r["first_bad_seq"]) for r in bad] == [(user_id, seq)], bad
    assert records[-1]["ok"] is False
    return bad[0]


# --- making checkpoints --------------------------------------------------------------------


def test_a_checkpoint_signs_every_chain_head_in_user_id_order(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    users = [make_user() for _ in range(3)]
    for n, user in enumerate(users, start=1):
        make_chain(world, user, n)
    path = world.checkpoint("cp.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "todo-api/audit-checkpoint/v1"
    assert doc["key_id"] == KEY.key_id
    assert doc["previous_root_hash"] is None
    expected = sorted(
        [
            u.user_id,
            len(events_of(world.engine, u.user_id)),
            events_of(world.engine, u.user_id)[-1]["hash"],
        ]
        for u in users
    )
    assert doc["leaves"] == expected
    assert doc["tree_size"] == 3
    checkpoint = read_checkpoint_file(path)
    checkpoint.verify({KEY.key_id: KEY.public})
    # Stored too, identical; the next one links to it.
    with world.engine.connect() as conn:
        row = conn.execute(sa.select(CHECKPOINTS)).one()
    assert (row.root_hash, row.signature, row.leaves) == (
        doc["root_hash"],
        doc["signature"],
        doc["leaves"],
    )
    second = json.loads(world.checkpoint("cp2.json").read_text())
    assert second["previous_root_hash"] == doc["root_hash"]


def test_checkpoint_to_stdout_and_the_signed_statement(world: World, user: Any) -> None:
    make_chain(world, user, 2)
    status, out, err = world.cli("audit", "checkpoint")
    assert status == 0, err
    doc = json.loads(out)
    statement = json.dumps(
        {
            k: doc[k]
            for k in (
                "format",
                "created_at",
                "tree_size",
                "root_hash",
                "previous_root_hash",
                "key_id",
            )
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    KEY.public.key.verify(base64.b64decode(doc["signature"]), statement)  # raises if not
    assert "Checkpoint of 1 chains" in err


def test_a_checkpoint_reads_only_the_chain_heads(world: World, user: Any) -> None:
    make_chain(world, user, 3)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(world.engine, "before_cursor_execute", record)
    try:
        with world.db.unit_of_work() as session:
            assert make_checkpoint(session, KEY) is not None
    finally:
        sa.event.remove(world.engine, "before_cursor_execute", record)
    assert any("audit_chain_heads" in s for s in statements)
    assert not any("audit_events" in s for s in statements), statements


def test_signing_a_checkpoint_is_not_taken_for_a_frozen_client(world: World, user: Any) -> None:
    """A million chains' tree takes seconds of Python inside the checkpoint's transaction;
    DB_IDLE_IN_TRANSACTION_TIMEOUT_MS would end it (and the checkpoint) as a frozen client's.
    Here the bound is 200 ms and the signing, slowed, takes a second."""
    make_chain(world, user, 1)
    quick = world.settings.model_copy(update={"db_idle_in_transaction_timeout_ms": 200})
    db = Database.from_settings(quick)
    try:
        with db.unit_of_work() as session:
            checkpoint = make_checkpoint(session, KEY)
            time.sleep(1.0)  # as long as signing a large tree takes, five times the bound
            session.execute(sa.text("SELECT 1"))
    finally:
        db.dispose()
    assert checkpoint is not None
    with world.engine.connect() as conn:
        stored = conn.execute(sa.select(CHECKPOINTS.c.root_hash)).scalars().all()
    assert checkpoint.head.root_hash in stored


def test_checkpoint_without_a_signing_key_is_a_usage_error(world: World) -> None:
    unsigned = world.settings.model_copy(update={"audit_signing_key": None})
    status, out, err = world.cli("audit", "checkpoint", settings=unsigned)
    assert (status, out) == (2, "")
    assert "AUDIT_SIGNING_KEY" in err


def test_stored_checkpoints_are_append_only(world: World, user: Any) -> None:
    make_chain(world, user, 1)
    world.checkpoint("cp.json")
    for statement in (
        "UPDATE audit_checkpoints SET root_hash = repeat('0', 64)",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints",
    ):
        with pytest.raises(sa.exc.DBAPIError, match="not allowed"), world.engine.begin() as conn:
            conn.execute(sa.text(statement))


def test_the_public_key_is_printed_and_served(world: World) -> None:
    status, pem, err = world.cli("audit", "public-key")
    assert status == 0
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert f"key id: {KEY.key_id}" in err
    [from_pem] = parse_public_keys(pem)
    status, jwks, _ = world.cli("audit", "public-key", "--format", "jwks")
    [from_jwks] = parse_public_keys(jwks)
    response = world.client.get("/.well-known/audit-keys.json")
    assert response.status_code == 200
    [served] = parse_public_keys(response.text)
    assert from_pem.key_id == from_jwks.key_id == served.key_id == KEY.key_id
    assert response.json()["keys"][0]["kid"] == KEY.key_id


# --- exactly one periodic checkpoint per interval -------------------------------------------


def test_concurrent_periodic_makers_make_exactly_one_per_interval(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    make_chain(world, make_user(), 2)
    makers = 8
    barrier = threading.Barrier(makers)
    results: list[Checkpoint | None] = []
    errors: list[BaseException] = []

    def maker() -> None:
        try:
            barrier.wait()
            with world.db.unit_of_work() as session:
                results.append(make_checkpoint(session, KEY, interval_seconds=3600))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=maker) for _ in range(makers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(results) == makers
    assert sum(r is not None for r in results) == 1
    with world.engine.connect() as conn:
        rows = conn.execute(sa.select(CHECKPOINTS.c.interval_start)).all()
    assert len(rows) == 1 and rows[0].interval_start is not None


def test_concurrent_manual_checkpoints_link_into_one_line(world: World, user: Any) -> None:
    make_chain(world, user, 1)
    barrier = threading.Barrier(5)

    def maker() -> None:
        barrier.wait()
        with world.db.unit_of_work() as session:
            make_checkpoint(session, KEY)

    threads = [threading.Thread(target=maker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    with world.engine.connect() as conn:
        rows = conn.execute(
            sa.select(CHECKPOINTS.c.root_hash, CHECKPOINTS.c.previous_root_hash).order_by(
                CHECKPOINTS.c.id
            )
        ).all()
    assert len(rows) == 5
    assert rows[0].previous_root_hash is None
    assert all(rows[i].previous_root_hash == rows[i - 1].root_hash for i in range(1, 5))


def test_the_service_makes_periodic_checkpoints(world: World, user: Any, tmp_path: Path) -> None:
    """Two app instances on one database, a 1-second interval: checkpoints appear, one per
    interval, and each instance's copies land in the checkpoint directory."""
    make_chain(world, user, 2)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    settings = world.settings.model_copy(
        update={"audit_checkpoint_interval_seconds": 1, "audit_checkpoint_dir": directory}
    )
    import time

    with (
        TestClient(create_app(settings, world.db)),
        TestClient(create_app(settings, world.db)),
    ):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with world.engine.connect() as conn:
                count = conn.execute(sa.select(sa.func.count()).select_from(CHECKPOINTS)).scalar()
            if count and count >= 3:
                break
            time.sleep(0.2)
    with world.engine.connect() as conn:
        starts = conn.execute(sa.select(CHECKPOINTS.c.interval_start)).scalars().all()
    assert len(starts) >= 3
    assert None not in starts and len(set(starts)) == len(starts)
    files = sorted(directory.glob("checkpoint-*.json"))
    assert len(files) >= 3
    status, records = world.verify("--checkpoint", *map(str, files))
    assert status == 0, records


def test_the_periodic_maker_skips_a_taken_interval(
    world: World, user: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_chain(world, user, 1)
    # A directory that cannot be written: the checkpoint is still stored, and the log says so.
    maker = PeriodicCheckpoints(world.db, KEY, 3600, tmp_path / "missing")
    first = maker.run_once()
    assert first is not None
    assert "stored but not written" in caplog.text
    assert maker.run_once() is None
    assert 0 < maker.seconds_to_next_interval() <= 3600 + 5
    with world.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CHECKPOINTS)).scalar() == 1


def test_a_checkpoint_of_an_empty_log_verifies(world: World) -> None:
    path = world.checkpoint("empty.json")
    doc = json.loads(path.read_text())
    assert (doc["tree_size"], doc["leaves"]) == (0, [])
    assert doc["root_hash"] == hashlib.sha256(b"").hexdigest()  # RFC 9162's empty tree
    status, records = world.verify("--checkpoint", str(path))
    assert status == 0, records


# --- tampering that plain verify cannot see -------------------------------------------------


def test_a_rewritten_and_rehashed_event_is_caught(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    victim, bystander = make_user(), make_user()
    task = make_chain(world, victim, 3)
    make_chain(world, bystander, 2)
    early = world.checkpoint("early.json")
    extend_chain(world, victim, task, 4, 6)
    late = world.checkpoint("late.json")
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_events SET after = jsonb_set(after, '{title}', '\"Forged\"'), "
                "changes = jsonb_set(changes, '{title,1}', '\"Forged\"') "
                "WHERE user_id = :u AND seq = 5"
            ),
            {"u": victim.user_id},
        )
        rehash(conn, victim.user_id, 5)
    assert events_of(world.engine, victim.user_id)[4]["after"]["title"] == "Forged"
    assert_plain_verify_passes(world)
    bad = assert_caught(world, [early, late], victim.user_id, 6)
    assert "the checkpoint of" in bad["reason"]
    assert "seqs 4 to 6" in bad["reason"]  # the early checkpoint still matches up to seq 3
    # With only the latest checkpoint, the rewrite is placed in seqs 1 to 6.
    bad = assert_caught(world, [late], victim.user_id, 6)
    assert "seqs 1 to 6" in bad["reason"]


def test_a_rewrite_before_an_earlier_checkpoint_is_named_at_that_checkpoint(
    world: World, user: Any
) -> None:
    task = make_chain(world, user, 2)
    early = world.checkpoint("early.json")
    extend_chain(world, user, task, 3, 5)
    late = world.checkpoint("late.json")
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text("UPDATE audit_events SET actor_id = 'mallory' WHERE user_id = :u AND seq = 1"),
            {"u": user.user_id},
        )
        rehash(conn, user.user_id, 1)
    assert_plain_verify_passes(world)
    bad = assert_caught(world, [late, early], user.user_id, 2)
    assert "seqs 1 to 2" in bad["reason"]


def test_a_deleted_tail_is_caught(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    victim, erased = make_user(), make_user()
    make_chain(world, victim, 6)
    make_chain(world, erased, 2)
    checkpoint = world.checkpoint("cp.json")
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq > 4"),
            {"u": victim.user_id},
        )
        rehash(conn, victim.user_id, 5)  # no events left to rehash: moves the head to seq 4
        # A whole history gone, head and all.
        conn.execute(sa.text("DELETE FROM audit_events WHERE user_id = :u"), {"u": erased.user_id})
        conn.execute(
            sa.text("DELETE FROM audit_chain_heads WHERE user_id = :u"), {"u": erased.user_id}
        )
    assert_plain_verify_passes(world)
    status, records = world.verify("--checkpoint", str(checkpoint))
    assert status == 1
    by_user = chains(records)
    assert by_user[victim.user_id]["first_bad_seq"] == 5
    assert "ends at seq 4 but the checkpoint of" in by_user[victim.user_id]["reason"]
    assert "recorded its head at seq 6" in by_user[victim.user_id]["reason"]
    assert by_user[erased.user_id]["ok"] is False
    assert by_user[erased.user_id]["first_bad_seq"] == 1


def test_swapped_events_are_caught(world: World, user: Any) -> None:
    make_chain(world, user, 6)
    checkpoint = world.checkpoint("cp.json")
    swapped = ("occurred_at", "action", "before", "after", "changes", "request_id", "trace_id")
    with tampering(world.engine) as conn:
        rows = {
            int(r["seq"]): r
            for r in conn.execute(
                sa.text("SELECT * FROM audit_events WHERE user_id = :u AND seq IN (3, 4)"),
                {"u": user.user_id},
            ).mappings()
        }
        for seq, other in ((3, 4), (4, 3)):
            assignments = ", ".join(f"{c} = :{c}" for c in swapped)
            values = {
                c: json.dumps(rows[other][c])
                if c in {"before", "after", "changes"}
                else rows[other][c]
                for c in swapped
            }
            conn.execute(
                sa.text(f"UPDATE audit_events SET {assignments} WHERE user_id = :u AND seq = :s"),
                {**values, "u": user.user_id, "s": seq},
            )
        rehash(conn, user.user_id, 3)
    events = events_of(world.engine, user.user_id)
    assert events[2]["after"]["title"] == "Step 4" and events[3]["after"]["title"] == "Step 3"
    assert_plain_verify_passes(world)
    assert_caught(world, [checkpoint], user.user_id, 6)


def test_a_forged_extra_event_before_the_head_is_caught(world: World, user: Any) -> None:
    make_chain(world, user, 6)
    checkpoint = world.checkpoint("cp.json")
    with tampering(world.engine) as conn:
        # Make room at seq 3 (through a high range: the (user_id, seq) index is unique).
        conn.execute(
            sa.text("UPDATE audit_events SET seq = seq + 1000 WHERE user_id = :u AND seq >= 3"),
            {"u": user.user_id},
        )
        conn.execute(
            sa.text("UPDATE audit_events SET seq = seq - 999 WHERE user_id = :u AND seq > 1000"),
            {"u": user.user_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO audit_events (occurred_at, user_id, actor_id, action, entity_type, "
                "entity_id, before, after, changes, seq, prev_hash, hash, hash_version) "
                "SELECT occurred_at, user_id, actor_id, action, entity_type, entity_id, before, "
                "after, changes, 3, prev_hash, hash, hash_version FROM audit_events "
                "WHERE user_id = :u AND seq = 2"
            ),
            {"u": user.user_id},
        )
        rehash(conn, user.user_id, 3)
    assert len(events_of(world.engine, user.user_id)) == 7
    assert_plain_verify_passes(world)
    assert_caught(world, [checkpoint], user.user_id, 6)


@pytest.mark.parametrize(
    "alteration", ["signature", "signature-text", "root", "leaf", "other-key", "format"]
)
def test_an_altered_checkpoint_file_is_refused(
    world: World,
    make_user,
    alteration: str,  # type: ignore[no-untyped-def]
) -> None:
    victim = make_user()
    make_chain(world, victim, 3)
    make_chain(world, make_user(), 1)
    path = world.checkpoint("cp.json")
    doc = json.loads(path.read_text())
    if alteration == "signature":
        raw = bytearray(base64.b64decode(doc["signature"]))
        raw[10] ^= 1
        doc["signature"] = base64.b64encode(bytes(raw)).decode()
        expected = "signature does not verify"
    elif alteration == "signature-text":
        # The same 64 bytes in other text: the last character before `==` carries 4 bits
        # that base64 decoding ignores. Altered is altered, though the bytes verify.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        text = doc["signature"]
        doc["signature"] = text[:-3] + alphabet[alphabet.index(text[-3]) ^ 1] + text[-2:]
        assert base64.b64decode(doc["signature"]) == base64.b64decode(text)
        expected = "`signature` is not a base64 Ed25519 signature"
    elif alteration == "root":
        doc["root_hash"] = ("0" if doc["root_hash"][0] != "0" else "1") + doc["root_hash"][1:]
        expected = "signature does not verify"
    elif alteration == "leaf":
        # What a tamperer would need after rehashing: the victim's head hash in the file.
        index = [leaf[0] for leaf in doc["leaves"]].index(victim.user_id)
        doc["leaves"][index][2] = "ab" * 32
        expected = "leaves do not hash to the signed root"
    elif alteration == "other-key":
        # Re-signed whole with a key of the tamperer's own.
        other = SigningKey.generate()
        path2 = world.tmp / "resigned.json"
        status, _, _ = world.cli(
            "audit", "checkpoint", "--output", str(path2), settings=with_key(world.settings, other)
        )
        assert status == 0
        doc = json.loads(path2.read_text())
        expected = "not among the trusted public keys"
    else:
        doc["tree_size"] = doc["tree_size"] + 1
        expected = "`tree_size` is"
    path.write_text(json.dumps(doc))
    status, records = world.verify("--checkpoint", str(path))
    assert status == 1
    [record] = [r for r in records if r["record"] == "checkpoint"]
    assert record["ok"] is False
    assert expected in record["reason"]
    assert records[-1]["checkpoint_failures"] == 1
    # The chains themselves are intact; only the file is refused.
    assert all(r["ok"] for r in records if r["record"] == "chain")


# --- successive checkpoints ------------------------------------------------------------------


def test_successive_checkpoints_of_a_growing_log_verify(  # type: ignore[no-untyped-def]
    world: World, make_user, caplog: pytest.LogCaptureFixture
) -> None:
    first_user = make_user()
    task = make_chain(world, first_user, 2)
    one = world.checkpoint("1.json")
    extend_chain(world, first_user, task, 3, 4)
    make_chain(world, make_user(), 2)  # a new user between checkpoints
    two = world.checkpoint("2.json")
    status, records = world.verify("--checkpoint", str(two), str(one))
    assert status == 0, records
    assert [r["record"] for r in records].count("checkpoint") == 2
    assert not [r for r in records if r["record"] == "succession"]
    assert "does not extend the previous checkpoint" not in caplog.text


def test_a_later_checkpoint_that_truncates_a_history_is_inconsistent(
    world: World, user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_chain(world, user, 5)
    before = world.checkpoint("before.json")
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq > 3"),
            {"u": user.user_id},
        )
        rehash(conn, user.user_id, 4)
    after = world.checkpoint("after.json")  # signed honestly, over the truncated heads
    # ... and the maker raised the alarm as it signed.
    alarms = [r for r in caplog.records if r.getMessage().startswith("audit chain does not")]
    assert [getattr(r, "user_id", None) for r in alarms] == [user.user_id]
    assert "went back from seq 5" in alarms[0].reason  # type: ignore[attr-defined]
    status, records = world.verify("--checkpoint", str(before), str(after))
    assert status == 1
    [succession] = [r for r in records if r["record"] == "succession"]
    assert succession["user_id"] == user.user_id
    assert "went back from seq 5" in succession["reason"] and "truncated" in succession["reason"]
    assert chains(records)[user.user_id]["first_bad_seq"] == 4


def test_old_checkpoints_verify_with_the_old_public_key_after_rotation(
    world: World, user: Any
) -> None:
    task = make_chain(world, user, 2)
    old = world.checkpoint("old.json")
    old_public = world.tmp / "old.pem"
    old_public.write_text(KEY.public.pem())
    rotated = with_key(world.settings, SigningKey.generate())
    extend_chain(world, user, task, 3, 3)
    new = world.checkpoint("new.json", settings=rotated)
    assert json.loads(new.read_text())["key_id"] != KEY.key_id

    def verify(*argv: str) -> tuple[int, list[dict[str, Any]]]:
        status, out, _ = world.cli("audit", "verify", *argv, settings=rotated)
        return status, json_lines(out)

    status, records = verify("--checkpoint", str(old), str(new), "--public-key", str(old_public))
    assert status == 0, records
    status, records = verify("--checkpoint", str(old), str(new))
    assert status == 1
    refused = [r for r in records if r["record"] == "checkpoint" and not r["ok"]]
    assert [r["file"] for r in refused] == [str(old)]


def test_verify_checkpoint_needs_trusted_keys(world: World, user: Any) -> None:
    make_chain(world, user, 1)
    path = world.checkpoint("cp.json")
    unsigned = world.settings.model_copy(update={"audit_signing_key": None})
    status, out, err = world.cli("audit", "verify", "--checkpoint", str(path), settings=unsigned)
    assert (status, out) == (2, "")
    assert "--public-key" in err
    garbage = world.tmp / "garbage.pem"
    garbage.write_text("not a key")
    status, _, err = world.cli(
        "audit", "verify", "--checkpoint", str(path), "--public-key", str(garbage)
    )
    assert status == 2 and "cannot use" in err


def test_input_files_nested_past_the_parsers_depth_are_refused_in_one_line(
    world: World, user: Any
) -> None:
    """JSON nested deeper than Python's parser recurses is a file that is not what it should
    be, like any other: a failed checkpoint record, or one line and exit 2 (each was a
    RecursionError traceback and exit 1)."""
    make_chain(world, user, 1)
    good = world.checkpoint("cp.json")
    deep = "[" * 100_000 + "]" * 100_000
    checkpoint = world.tmp / "deep-checkpoint.json"
    checkpoint.write_text('{"leaves": ' + deep + "}")
    status, records = world.verify("--checkpoint", str(checkpoint))
    assert status == 1
    [record] = [r for r in records if r["record"] == "checkpoint"]
    assert record["ok"] is False and "cannot read it as JSON" in record["reason"]

    keys = world.tmp / "deep-keys.json"
    keys.write_text('{"keys": ' + deep + "}")
    status, out, err = world.cli(
        "audit", "verify", "--checkpoint", str(good), "--public-key", str(keys)
    )
    assert (status, out) == (2, "")
    assert err.startswith(f"todo-api: cannot use {keys} as a public key: not JSON")

    export = world.tmp / "deep-export.ndjson"
    export.write_text('{"record": "end", "count": 0, "chains": ' + deep + "}\n")
    status, out, err = world.cli("audit", "verify", "--against", str(export))
    assert (status, out) == (2, "")
    assert err == f"todo-api: cannot use {export} as an export: the last line is not JSON\n"


# --- configuration ---------------------------------------------------------------------------


def test_signing_key_configuration(base_settings: Settings, tmp_path: Path) -> None:
    seed = KEY.private.private_bytes_raw()
    for text in (
        KEY.private_pem(),
        base64.b64encode(seed).decode(),
        base64.urlsafe_b64encode(seed).decode().rstrip("="),
    ):
        configured = signing_key(
            base_settings.model_copy(update={"audit_signing_key": SecretStr(text)})
        )
        assert configured is not None and configured.key_id == KEY.key_id
    key_file = tmp_path / "audit.pem"
    key_file.write_text(KEY.private_pem())
    from_file = signing_key(base_settings.model_copy(update={"audit_signing_key_file": key_file}))
    assert from_file is not None and from_file.key_id == KEY.key_id
    assert signing_key(base_settings) is None
    for bad in ("not a key", base64.b64encode(b"short").decode(), "-----BEGIN PRIVATE KEY-----"):
        with pytest.raises(ConfigError, match="unusable"):
            signing_key(base_settings.model_copy(update={"audit_signing_key": SecretStr(bad)}))
    missing = base_settings.model_copy(update={"audit_signing_key_file": tmp_path / "nope.pem"})
    with pytest.raises(ConfigError, match="unusable"):
        signing_key(missing)


def test_settings_refuse_an_interval_without_a_key_and_two_keys(base_settings: Settings) -> None:
    common = {"database_url": base_settings.database_url, "_env_file": None}
    with pytest.raises(ValidationError, match="needs a signing key"):
        Settings(**common, audit_checkpoint_interval_seconds=60)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not both"):
        Settings(  # type: ignore[arg-type]
            **common, audit_signing_key=KEY.private_pem(), audit_signing_key_file="/k.pem"
        )
    made = Settings(
        **common, audit_signing_key=KEY.private_pem(), audit_checkpoint_interval_seconds=60
    )  # type: ignore[arg-type]
    assert made.audit_checkpoint_interval_seconds == 60
    assert KEY.private_pem() not in repr(made)


def test_the_real_command_with_a_key_file_and_with_an_unusable_key(
    world: World, user: Any, tmp_path: Path
) -> None:
    """`todo-api` as a subprocess: checkpoint and public-key from AUDIT_SIGNING_KEY_FILE; a
    broken AUDIT_SIGNING_KEY stops `serve` with a message, not a traceback or the key."""
    make_chain(world, user, 2)
    key_file = tmp_path / "audit-signing.pem"
    key_file.write_text(KEY.private_pem())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "DATABASE_", "APP_"))}
    env |= {"OTEL_SDK_DISABLED": "true", "DATABASE_URL": world.settings.database_url}
    todo_api = str(Path(sys.executable).parent / "todo-api")

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [todo_api, *args],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = run("audit", "checkpoint", AUDIT_SIGNING_KEY_FILE=str(key_file))
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["leaves"] == [
        [user.user_id, 2, events_of(world.engine, user.user_id)[-1]["hash"]]
    ]
    printed = run("audit", "public-key", AUDIT_SIGNING_KEY_FILE=str(key_file))
    assert printed.stdout == KEY.public.pem()
    broken = "c2VjcmV0LWJ1dC1ub3QtYS1rZXk"
    refused = run("serve", "--no-migrate", "--port", "1", AUDIT_SIGNING_KEY=broken)
    assert refused.returncode == 2
    assert "audit signing key is unusable" in refused.stderr
    assert "Traceback" not in refused.stderr and broken not in refused.stderr


def test_the_command_names_each_chain_that_went_back_on_stderr(
    world: World, user: Any, tmp_path: Path
) -> None:
    """`todo-api audit checkpoint` run from a job: the alarm for a truncated chain says which
    chain and how, as the service's log line does (the command configures no logging, and
    Python's last resort printed the message alone). stdout stays the checkpoint."""
    make_chain(world, user, 5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIT_", "DATABASE_", "APP_"))}
    env |= {
        "OTEL_SDK_DISABLED": "true",
        "DATABASE_URL": world.settings.database_url,
        "AUDIT_SIGNING_KEY": KEY.private_pem(),
    }
    todo_api = str(Path(sys.executable).parent / "todo-api")

    def checkpoint() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [todo_api, "audit", "checkpoint"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert checkpoint().returncode == 0
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text("DELETE FROM audit_events WHERE user_id = :u AND seq > 3"),
            {"u": user.user_id},
        )
        rehash(conn, user.user_id, 4)
    made = checkpoint()
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["leaves"][0][:2] == [user.user_id, 3]
    [alarm] = [line for line in made.stderr.splitlines() if "does not extend" in line]
    assert user.user_id in alarm, made.stderr
    assert "went back from seq 5" in alarm and "to seq 3" in alarm, made.stderr


def test_a_malformed_stored_checkpoint_does_not_stop_the_next_ones(
    world: World, user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's own role may INSERT into audit_checkpoints (no trigger to disable): one
    row whose leaves cannot be read made every later checkpoint fail, the periodic maker's
    each interval and `audit checkpoint` with a traceback, so that nothing after it was
    signed. The next checkpoint is signed all the same, and says why it compared nothing."""
    make_chain(world, user, 2)
    world.checkpoint("before.json")
    with world.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_checkpoints (created_at, tree_size, root_hash, key_id, "
                "signature, leaves) VALUES (now(), 1, repeat('a', 64), 'ab', "
                "repeat('A', 86) || '==', '[1]')"
            )
        )
    make_chain(world, user, 1)
    after = world.checkpoint("after.json")
    assert read_checkpoint_file(after).head.previous_root_hash is None
    alarms = [r for r in caplog.records if "previous stored checkpoint" in r.getMessage()]
    assert alarms and "cannot be read" in alarms[0].getMessage(), caplog.text
    status, records = world.verify("--checkpoint", str(world.tmp / "before.json"), str(after))
    assert status == 0, records
