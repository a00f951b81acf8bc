"""Change-feed benchmark: open streams one worker holds, and commit-to-event latency.

    .venv/bin/python bench/feed.py                      # 1,000 idle streams, 200 samples
    .venv/bin/python bench/feed.py --idle 1000,4000 --samples 200

It creates the database `todo_bench_feed`, starts `todo-api serve` (one worker, production
settings, tracing off, rate limits off) and, for each count of idle streams:

1. opens that many streams, each of its own user (so they stay idle: nobody writes to them),
   with plain asyncio sockets, and reports the worker's resident memory;
2. with those streams open, commits `--samples` audit events for one more user whose stream is
   being read, one at a time, straight to PostgreSQL through the service's own recorder, and
   times each from the moment COMMIT returned to the moment its event arrived on the stream.

The first row (0 idle streams) is the baseline; the others' extra latency is the cost of the
idle streams. The machine is shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from audit.recorder import AuditContext, record_event  # noqa: E402
from service.auth import create_dev_token  # noqa: E402
from service.database import Database, build_engine  # noqa: E402
from service.settings import AppEnv, Settings  # noqa: E402

TODO_API = Path(sys.executable).parent / "todo-api"
DB_NAME = "todo_bench_feed"
SERVER = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
SECRET = secrets.token_urlsafe(32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Stream:
    """One open stream on a raw socket: reads ids as they arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.arrivals: dict[int, float] = {}

    @classmethod
    async def open(cls, port: int, user_id: str) -> Stream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        token = create_dev_token(SECRET, user_id, ttl_seconds=3600)
        writer.write(
            (
                f"GET /api/{user_id}/events HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream refused: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer)

    async def read_ids(self) -> None:
        # Chunked transfer: each event is one chunk, so its `id:` line is whole.
        while line := await self.reader.readline():
            if line.startswith(b"id: "):
                self.arrivals[int(line[4:])] = time.perf_counter()

    def close(self) -> None:
        self.writer.close()


def commit_events(database: Database, user_id: str, count: int, gap: float) -> list[float]:
    """Commit `count` events one by one; the time each COMMIT returned."""
    done: list[float] = []
    for n in range(count):
        with database.unit_of_work() as session:
            record_event(
                session,
                AuditContext(actor_id=user_id),
                user_id=user_id,
                action="bench.probe",
                entity_type="bench",
                entity_id=str(n),
                before=None,
                after={"n": n},
                diff_fields=(),
            )
        done.append(time.perf_counter())
        time.sleep(gap)
    return done


async def measure(
    port: int, database: Database, idle: int, samples: int, pid: int
) -> dict[str, float]:
    opened: list[Stream] = []
    started = time.perf_counter()
    batch = 100
    for first in range(0, idle, batch):
        opened += await asyncio.gather(
            *(
                Stream.open(port, f"bench-idle-{idle}-{n}")
                for n in range(first, min(first + batch, idle))
            )
        )
    open_seconds = time.perf_counter() - started
    await asyncio.sleep(2)
    memory = rss_mib(pid)
    probe_user = f"bench-probe-{idle}-{secrets.token_hex(4)}"
    probe = await Stream.open(port, probe_user)
    reading = asyncio.create_task(probe.read_ids())
    committed = await asyncio.to_thread(commit_events, database, probe_user, samples, 0.02)
    deadline = time.monotonic() + 30
    while len(probe.arrivals) < samples and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    reading.cancel()
    latencies = [
        (probe.arrivals[seq] - committed[seq - 1]) * 1000
        for seq in range(1, samples + 1)
        if seq in probe.arrivals
    ]
    for stream in [*opened, probe]:
        stream.close()
    return {
        "idle": idle,
        "open_seconds": open_seconds,
        "rss_mib": memory,
        "received": len(latencies),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "max": max(latencies) if latencies else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", default="0,1000", help="idle stream counts, comma-separated")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    counts = [int(n) for n in args.idle.split(",")]

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    admin = sa.create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {DB_NAME}"))
    url = f"{SERVER}/{DB_NAME}"
    port = free_port()
    env = {
        **os.environ,
        "APP_ENV": "production",
        "DATABASE_URL": url,
        "BETTER_AUTH_SECRET": SECRET,
        "OTEL_SDK_DISABLED": "true",
        "RATE_LIMIT_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
        "FEED_MAX_STREAMS_PER_WORKER": "100000",
        "FEED_HEARTBEAT_SECONDS": "15",
    }
    log = tempfile.NamedTemporaryFile(prefix="feed-serve-", suffix=".log")  # noqa: SIM115
    server = subprocess.Popen(
        [str(TODO_API), "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    settings = Settings(
        _env_file=None,
        app_env=AppEnv.test,
        database_url=url,
        better_auth_secret=SECRET,
    )
    database = Database(build_engine(settings))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("todo-api serve did not start") from None
                time.sleep(0.2)
        time.sleep(1)
        worker = server.pid
        print(f"one worker (pid {worker}), {args.samples} events per row, load {os.getloadavg()}")
        print("| idle streams | opened in s | worker RSS MiB | events | p50 ms | p99 ms | max ms |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        for idle in counts:
            row = asyncio.run(measure(port, database, idle, args.samples, worker))
            print(
                f"| {row['idle']:,} | {row['open_seconds']:.1f} | {row['rss_mib']:.0f} | "
                f"{row['received']}/{args.samples} | {row['p50']:.1f} | {row['p99']:.1f} | "
                f"{row['max']:.1f} |",
                flush=True,
            )
            time.sleep(2)
    finally:
        database.dispose()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
