"""Helpers for the checkpoint and proof tests (no tests here): a database of one's own with the
app on it and a signing key configured, and the tamperer's re-hashing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr

from audit.chain import compute_hash
from audit.signing import SigningKey
from service.app import create_app
from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import change, json_lines, run_cli, scratch_database
from tests.support import create_task

KEY = SigningKey.generate()


@dataclass
class World:
    """A migrated database of its own, the app on it, and the operator's CLI."""

    settings: Settings
    db: Database
    client: TestClient
    tmp: Path

    @property
    def engine(self) -> sa.Engine:
        return self.db.engine

    def cli(self, *argv: str, settings: Settings | None = None) -> tuple[int, str, str]:
        return run_cli(settings or self.settings, *argv)

    def checkpoint(self, name: str, settings: Settings | None = None) -> Path:
        path = self.tmp / name
        status, _, err = self.cli("audit", "checkpoint", "--output", str(path), settings=settings)
        assert status == 0, err
        return path

    def verify(self, *argv: str) -> tuple[int, list[dict[str, Any]]]:
        status, out, _ = self.cli("audit", "verify", *argv)
        return status, json_lines(out)


def with_key(settings: Settings, key: SigningKey) -> Settings:
    return settings.model_copy(update={"audit_signing_key": SecretStr(key.private_pem())})


@contextmanager
def checkpoint_world(base_settings: Settings, tmp_path: Path) -> Iterator[World]:
    """A migrated database of its own, the app on it with KEY configured."""
    with scratch_database() as url:
        settings = with_key(base_settings.model_copy(update={"database_url": url}), KEY)
        db = Database(build_engine(settings))
        try:
            with TestClient(create_app(settings, db), raise_server_exceptions=False) as client:
                yield World(settings, db, client, tmp_path)
        finally:
            db.dispose()


def make_chain(world: World, user: Any, length: int) -> dict[str, Any]:
    task = create_task(world.client, user, "Step 1")
    extend_chain(world, user, task, 2, length)
    return task


def extend_chain(world: World, user: Any, task: dict[str, Any], first: int, last: int) -> None:
    for n in range(first, last + 1):
        change(world.client, "PUT", f"/{task['id']}", user, json={"title": f"Step {n}"})


def rehash(conn: sa.Connection, user_id: str, from_seq: int) -> None:
    """What a tamperer does after editing: relink and recompute every later hash, and move
    the chain head, so that the chain verifies on its own again."""
    prev = conn.execute(
        sa.text("SELECT hash FROM audit_events WHERE user_id = :u AND seq = :s"),
        {"u": user_id, "s": from_seq - 1},
    ).scalar() or ("0" * 64)
    rows = conn.execute(
        sa.text("SELECT * FROM audit_events WHERE user_id = :u AND seq >= :s ORDER BY seq"),
        {"u": user_id, "s": from_seq},
    ).mappings()
    last_seq, last_hash = from_seq - 1, prev
    for row in list(rows):
        event = {**row, "prev_hash": last_hash}
        new_hash = compute_hash(event, row["hash_version"])
        conn.execute(
            sa.text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE id = :id"),
            {"p": last_hash, "h": new_hash, "id": row["id"]},
        )
        last_seq, last_hash = int(row["seq"]), new_hash
    conn.execute(
        sa.text("UPDATE audit_chain_heads SET seq = :s, hash = :h WHERE user_id = :u"),
        {"s": last_seq, "h": last_hash, "u": user_id},
    )
