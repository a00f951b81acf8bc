"""The benchmark's own database: created, migrated with `todo-api migrate`, seeded through SQL.

Every seeded task has a priority, a due date (from 20 days ago to 40 days ahead) and two of
its user's ten tags (`tag0`..`tag9`). Seeded tasks get the audit events the service would
have written for them (`task.created`, hashed with `audit.chain.compute_hash` and linked into
each user's chain, in the same transaction with xact_id = txid_current()), so the
completeness trigger accepts them and the chains stay verifiable. Only the request metadata
(request id, trace, client) is left empty.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg2
from psycopg2.extensions import connection as PgConnection

from audit.append import EVENT_COLUMNS as RECORDED_COLUMNS
from audit.chain import GENESIS_HASH, HASH_VERSION, compute_hash
from audit.recorder import diff
from bench.measure import PgTarget
from service.tags.rules import sorted_names
from service.tasks.models import TaskRecord
from service.tasks.rules import DIFF_FIELDS

TAGS_PER_USER = 10
# A task row as the service reads it, for the audit snapshot the service would record (tags
# are linked after the insert: added below).
_RECORD_COLUMNS = ", ".join(
    "'{}'::varchar[] AS tags" if field.name == "tags" else field.name
    for field in fields(TaskRecord)
)
# The recorder's columns, plus the transaction id that the completeness guard checks.
EVENT_COLUMNS = (*RECORDED_COLUMNS, "xact_id")


def pg_target(server_url: str, dbname: str) -> PgTarget:
    parts = urlsplit(server_url)
    if parts.scheme.split("+", 1)[0] not in {"postgres", "postgresql"}:
        raise SystemExit(f"--pg-url must be a postgresql:// URL, not {server_url!r}")
    return PgTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password) if parts.password else None,
        dbname=dbname,
    )


def database_url(target: PgTarget) -> str:
    auth = quote(target.user, safe="")
    if target.password:
        auth += ":" + quote(target.password, safe="")
    return f"postgresql://{auth}@{target.host}:{target.port}/{target.dbname}"


def connect(target: PgTarget, dbname: str | None = None) -> PgConnection:
    return psycopg2.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        dbname=dbname or target.dbname,
        application_name="todo-api-bench-seed",
    )


def recreate_database(target: PgTarget) -> None:
    if not target.dbname.replace("_", "").isalnum():
        raise SystemExit(f"refusing odd database name {target.dbname!r}")
    conn = connect(target, "postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{target.dbname}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{target.dbname}"')
    conn.close()


def drop_database(target: PgTarget) -> None:
    conn = connect(target, "postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{target.dbname}" WITH (FORCE)')
    conn.close()


def migrate(todo_api: Path, target: PgTarget, env: dict[str, str]) -> None:
    # Its log lines go to stderr with the harness's progress; stdout carries only the report.
    subprocess.run(
        [str(todo_api), "migrate"],
        env={**env, "DATABASE_URL": database_url(target)},
        stdout=sys.stderr,
        check=True,
        timeout=300,
    )


@dataclass(frozen=True, slots=True)
class SeededUser:
    user_id: str
    first_task_id: int
    task_count: int
    events: int


# Tasks per transaction. The running count's trigger updates the user's row once per task:
# within one transaction those row versions cannot be pruned, so each update walks all of the
# earlier ones (100,000 tasks in one transaction: many minutes; in batches: about a minute).
SEED_BATCH = 5_000


def seed_user(target: PgTarget, user_id: str, tasks: int) -> SeededUser:
    """`tasks` tasks with contiguous ids and their `task.created` events, `SEED_BATCH` a
    transaction, each batch's events continuing the user's chain.

    The guard's lookup is planned per call (0005) and found by the task (0013), so the
    batches can share a connection: each takes the same time, however large the log.
    """
    batches: list[SeededUser] = []
    remaining = tasks
    conn = connect(target)
    try:
        while remaining > 0 or not batches:
            size = min(remaining, SEED_BATCH)
            batches.append(_seed_user(conn, user_id, size))
            remaining -= size
    finally:
        conn.close()
    first = batches[0].first_task_id
    count = sum(b.task_count for b in batches)
    last = batches[-1].first_task_id + batches[-1].task_count - 1
    if count and last - first + 1 != count:
        raise RuntimeError(f"task ids of {user_id} are not contiguous; is something else writing?")
    return SeededUser(user_id, first, count, sum(b.events for b in batches))


def _seed_user(conn: PgConnection, user_id: str, tasks: int) -> SeededUser:
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO users (id) VALUES (%s) ON CONFLICT (id) DO NOTHING",
            (user_id,),
        )
        cur.execute("SELECT txid_current(), clock_timestamp()")
        xact_id, now = cur.fetchone()
        cur.execute(
            """
            INSERT INTO tags (user_id, name, created_at)
            SELECT %(user)s, 'tag' || k, %(now)s FROM generate_series(0, %(k)s - 1) AS k
            ON CONFLICT DO NOTHING
            """,
            {"user": user_id, "now": now, "k": TAGS_PER_USER},
        )
        # Created one millisecond apart, oldest first, so the list order is meaningful.
        cur.execute(
            """
            INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at,
                               priority, due_at, version)
            SELECT %(user)s, 'seed task ' || g,
                   'seeded description ' || g,
                   g %% 3 = 0,
                   %(start)s + g * interval '1 millisecond',
                   %(start)s + g * interval '1 millisecond',
                   (ARRAY['none', 'low', 'medium', 'high'])[1 + g %% 4]::task_priority,
                   %(now)s + ((g * 7919) %% 86400 - 28800) * interval '1 minute',
                   1
            FROM generate_series(1, %(n)s) AS g
            ORDER BY g
            RETURNING """
            + _RECORD_COLUMNS,
            {
                "user": user_id,
                "n": tasks,
                "now": now,
                "start": now - timedelta(milliseconds=tasks + 1),
            },
        )
        rows = sorted(cur.fetchall())
        first_id = rows[0][0] if rows else 0
        # Two tags per task: tag(i mod 10) and tag((i + 3) mod 10), i = the task's position.
        cur.execute(
            """
            INSERT INTO task_tags (task_id, tag_id, user_id)
            SELECT t.id, tg.id, t.user_id
            FROM tasks t JOIN tags tg ON tg.user_id = t.user_id
             AND tg.name IN ('tag' || ((t.id - %(first)s) %% 10),
                             'tag' || ((t.id - %(first)s + 3) %% 10))
            WHERE t.user_id = %(user)s AND t.id >= %(first)s
            """,
            {"user": user_id, "first": first_id},
        )
        cur.execute(
            "SELECT seq, hash FROM audit_chain_heads WHERE user_id = %s FOR UPDATE", (user_id,)
        )
        head = cur.fetchone()
        seq, prev_hash = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        occurred = now.astimezone(UTC)
        for row in rows:
            task = TaskRecord.from_row(row)
            position = task.id - first_id
            tags = sorted_names([f"tag{position % 10}", f"tag{(position + 3) % 10}"])
            task = replace(task, tags=tuple(tags))
            task_id, after = task.id, task.state()
            seq += 1
            occurred += timedelta(microseconds=1)
            event: dict[str, Any] = {
                "user_id": user_id,
                "seq": seq,
                "prev_hash": prev_hash,
                "occurred_at": occurred,
                "actor_id": user_id,
                "action": "task.created",
                "entity_type": "task",
                "entity_id": str(task_id),
                "before": None,
                "after": after,
                "changes": diff(None, after, DIFF_FIELDS),
                "request_id": None,
                "trace_id": None,
                "span_id": None,
                "client_ip": None,
                "user_agent": None,
                "caused_by_seq": None,
            }
            event["hash"] = prev_hash = compute_hash(event)
            writer.writerow(_csv_row(event, xact_id))
        buffer.seek(0)
        cur.copy_expert(
            f"COPY audit_events ({', '.join(EVENT_COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
            buffer,
        )
        cur.execute(
            """
            INSERT INTO audit_chain_heads (user_id, seq, hash) VALUES (%s, %s, %s)
            ON CONFLICT (user_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
            """,
            (user_id, seq, prev_hash),
        )
    first = rows[0][0] if rows else 0
    if rows and rows[-1][0] - first + 1 != len(rows):
        raise RuntimeError(f"task ids of {user_id} are not contiguous; is something else writing?")
    return SeededUser(user_id, first, len(rows), len(rows))


def _csv_row(event: dict[str, Any], xact_id: int) -> list[Any]:
    values = dict(event, hash_version=HASH_VERSION, xact_id=xact_id)
    row: list[Any] = []
    for name in EVENT_COLUMNS:
        value = values[name]
        if name in {"before", "after", "changes"}:
            # SQLAlchemy's JSON type stores Python None as JSON null, not SQL NULL.
            row.append(json.dumps(value))
        elif isinstance(value, datetime):
            row.append(value.isoformat())
        else:
            row.append(value)  # None becomes an unquoted empty field: NULL
    return row


def vacuum_analyze(target: PgTarget) -> None:
    conn = connect(target)
    conn.autocommit = True
    with conn.cursor() as cur:
        for table in ("users", "tasks", "tags", "task_tags", "audit_events", "audit_chain_heads"):
            cur.execute(f"VACUUM (ANALYZE) {table}")
    conn.close()


def counts(target: PgTarget) -> dict[str, int]:
    conn = connect(target)
    with conn, conn.cursor() as cur:
        result = {}
        for table in ("users", "tasks", "audit_events"):
            cur.execute(f"SELECT count(*) FROM {table}")
            result[table] = int(cur.fetchone()[0])
    conn.close()
    return result


def clean_env() -> dict[str, str]:
    """This process's environment without the service's own settings (they are set per run)."""
    prefixes = (
        "OTEL_",
        "LOG_",
        "DB_",
        "BETTER_AUTH_",
        "JWT_",
        "JWKS_",
        "CORS_",
        "APP_ENV",
        "DATABASE_URL",
        "TRUSTED_PROXIES",
        "MAX_BODY_BYTES",
        "JAEGER_",
    )
    return {k: v for k, v in os.environ.items() if not k.upper().startswith(prefixes)}
