"""Audit checkpoint cost at scale: time and size of a checkpoint over N seeded users.

    .venv/bin/python bench/checkpoint.py [--users 10000] [--tasks 2] [--rounds 5]

Creates the database `todo_bench_checkpoint` (PostgreSQL at --pg-url), migrates it, seeds N
users each with a few tasks and their chained `task.created` events (bench/seed.py), then
prints, as a Markdown table: the time to make a checkpoint (read the heads, build the tree,
sign, store, commit; median and max of --rounds), the checkpoint file's size (plain and
gzipped), the stored row's size, the time to answer one user's proof the way the endpoint does
(first request after a checkpoint, then later ones), and the time to check a checkpoint file
(parse, signature, root). Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import gzip
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench`, `service`, `audit` importable
    sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from audit.checkpoint import (  # noqa: E402
    Leaf,
    make_checkpoint,
    read_checkpoint_file,
    sign_leaves,
)
from audit.proof import LatestProofs  # noqa: E402
from audit.signing import SigningKey  # noqa: E402
from bench.seed import (  # noqa: E402
    _seed_user,
    clean_env,
    connect,
    database_url,
    drop_database,
    migrate,
    pg_target,
    recreate_database,
    vacuum_analyze,
)
from service.database import Database  # noqa: E402
from service.settings import AppEnv, Settings  # noqa: E402


def log(message: str) -> None:
    print(f"[checkpoint-bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="todo_bench_checkpoint")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=2, help="tasks (and events) per user")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    return parser.parse_args(argv)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = pg_target(args.pg_url, args.db_name)
    recreate_database(target)
    try:
        migrate(Path(sys.executable).parent / "todo-api", target, clean_env())
        log(f"seeding {args.users} users with {args.tasks} tasks each")
        started = time.perf_counter()
        conn = connect(target)
        try:
            user_ids = [secrets.token_urlsafe(24) for _ in range(args.users)]
            for user_id in user_ids:
                _seed_user(conn, user_id, args.tasks)
        finally:
            conn.close()
        vacuum_analyze(target)
        log(f"seeded in {time.perf_counter() - started:.0f} s")

        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            app_env=AppEnv.test,
            database_url=database_url(target),
        )
        db = Database.from_settings(settings)
        key = SigningKey.generate()
        make_times = []
        checkpoint = None
        for _ in range(args.rounds):
            started = time.perf_counter()
            with db.unit_of_work() as session:
                checkpoint = make_checkpoint(session, key)
            make_times.append(time.perf_counter() - started)
        assert checkpoint is not None
        # Where the time goes: reading the heads, and the tree and signature in Python.
        read_times, sign_times = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            with db.engine.connect() as conn3:
                heads = conn3.execute(text("SELECT user_id, seq, hash FROM audit_chain_heads"))
                leaves = [Leaf(u, int(s), h) for u, s, h in heads]
            read_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            sign_leaves(key, leaves, datetime.now(UTC), None)
            sign_times.append(time.perf_counter() - started)
        document = checkpoint.to_json().encode("utf-8")
        with db.engine.connect() as conn2:
            row_bytes = conn2.execute(
                text("SELECT pg_column_size(c.*) FROM audit_checkpoints c ORDER BY id DESC LIMIT 1")
            ).scalar_one()
            table_bytes = conn2.execute(
                text("SELECT pg_total_relation_size('audit_checkpoints')")
            ).scalar_one()

        proofs = LatestProofs()
        proof_times = []
        for user_id in user_ids[: min(21, len(user_ids))]:
            started = time.perf_counter()
            with db.sessionmaker() as session:
                assert proofs.proof(session, user_id) is not None
            proof_times.append(time.perf_counter() - started)

        verify_times = []
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.json"
            path.write_bytes(document)
            for _ in range(args.rounds):
                started = time.perf_counter()
                read_checkpoint_file(path).verify({key.key_id: key.public})
                verify_times.append(time.perf_counter() - started)
        db.dispose()

        print(f"\nAudit checkpoint, {args.users:,} users ({args.tasks} events each):\n")
        print("| figure | value |")
        print("|---|--:|")
        print(
            f"| make a checkpoint (heads, tree, sign, store, commit), median / max ms "
            f"| {ms(statistics.median(make_times))} / {ms(max(make_times))} |"
        )
        print(f"| of which: read the heads, median ms | {ms(statistics.median(read_times))} |")
        print(
            f"| of which: sort, leaf hashes, tree, sign (Python), median ms "
            f"| {ms(statistics.median(sign_times))} |"
        )
        print(f"| checkpoint file, bytes | {len(document):,} |")
        print(f"| checkpoint file gzipped, bytes | {len(gzip.compress(document)):,} |")
        print(f"| stored row (TOAST-compressed), bytes | {row_bytes:,} |")
        print(f"| audit_checkpoints after {args.rounds} checkpoints, bytes | {table_bytes:,} |")
        print(
            f"| one user's proof, first after a new checkpoint (load it, build the tree), ms "
            f"| {ms(proof_times[0])} |"
        )
        print(
            f"| one user's proof, later requests (tree cached per process), median ms "
            f"| {ms(statistics.median(proof_times[1:]))} |"
        )
        print(
            f"| check a checkpoint file (parse, signature, root), median ms "
            f"| {ms(statistics.median(verify_times))} |"
        )
    finally:
        if not args.keep:
            drop_database(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
