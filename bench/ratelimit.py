"""What rate limiting costs on the create path: the service with limits off, counted in memory,
and counted in Redis, driven alike by wrk; the figure to quote is the ratio to "off".

    .venv/bin/python bench/ratelimit.py [--quick] [--redis-url redis://127.0.0.1:6379/0]

Needs PostgreSQL at --pg-url, Redis at --redis-url and wrk. It creates (and drops) its own
database, starts the three servers side by side (tracing off, to isolate the limiter), and in
each round runs them in a rotated order; the ratio is taken within a round, then the median.
Writes go to 1,000 users picked at random, so with the default write limit (120/minute per
user) no request is refused: the figures are the limiter's overhead, not cheaper 429s. The
run fails if any response was not 201.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from bench.measure import LoadResult, run_wrk  # noqa: E402
from bench.run import LUA, TODO_API, Server, ensure_tool, log  # noqa: E402
from service.auth import create_dev_token  # noqa: E402

MODES = ("off", "memory", "redis")


def limiter_cost(redis_url: str, prefix: str, calls: int = 3000) -> dict[str, tuple[float, float]]:
    """The limiter alone, in this process: CPU and wall microseconds per request (the hit and
    the window read), over 1,000 users. Steadier than req/s on a shared machine."""
    import asyncio

    from pydantic import SecretStr

    from service.ratelimit import Category, RateLimiter
    from service.settings import Settings

    async def measure(limiter: RateLimiter) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        for n in range(calls):
            await limiter.hit(Category.write, "user", f"u{n % 1000}")
        return (
            (time.process_time() - cpu) / calls * 1e6,
            (time.perf_counter() - wall) / calls * 1e6,
        )

    out = {}
    for mode, extra in (
        ("memory", {}),
        ("redis", {"redis_url": SecretStr(redis_url), "rate_limit_key_prefix": prefix}),
    ):
        settings = Settings(_env_file=None, **extra)  # type: ignore[arg-type]
        out[mode] = asyncio.run(measure(RateLimiter(settings)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="todo_bench_ratelimit")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="one round of 3 s")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    return args


def create_database(args: argparse.Namespace) -> str:
    admin = sa.create_engine(
        sa.make_url(args.pg_url).set(drivername="postgresql+psycopg2", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{args.db_name}"'))
    admin.dispose()
    url = sa.make_url(args.pg_url).set(database=args.db_name)
    return url.render_as_string(hide_password=False)


def drop_database(args: argparse.Namespace) -> None:
    admin = sa.create_engine(
        sa.make_url(args.pg_url).set(drivername="postgresql+psycopg2", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)'))
    admin.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tool("wrk", "wrk")
    work = args.results / "ratelimit-work"
    work.mkdir(parents=True, exist_ok=True)
    database_url = create_database(args)
    secret = secrets.token_urlsafe(48)
    prefix = f"todo-api-bench-{secrets.token_hex(4)}"
    base = {
        "PATH": "/usr/bin:/bin",
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": secret,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
        "OTEL_TRACES_EXPORTER": "none",
    }
    subprocess.run([str(TODO_API), "migrate"], env=base, check=True, capture_output=True)
    users = [f"bench-rl-{n}" for n in range(args.users)]
    data = work / "users.tsv"
    data.write_text(
        "".join(f"{u}\t{create_dev_token(secret, u, ttl_seconds=86400)}\t1\t1\n" for u in users)
    )
    envs = {
        "off": {**base, "RATE_LIMIT_ENABLED": "false"},
        "memory": {**base, "RATE_LIMIT_ENABLED": "true"},
        "redis": {
            **base,
            "RATE_LIMIT_ENABLED": "true",
            "REDIS_URL": args.redis_url,
            "RATE_LIMIT_KEY_PREFIX": prefix,
        },
    }
    servers = {
        mode: Server(f"rl-{mode}", envs[mode], work / f"server-{mode}.log", args.workers)
        for mode in MODES
    }
    concurrency = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        for server in servers.values():
            server.start(work)
        for server in servers.values():
            server.wait_ready()
            log(f"{server.name} ready at {server.url}")
        wrk_env = {"BENCH_OP": "create", "BENCH_DATA": str(data)}
        # Warm-up: every user provisioned, every pool connection open.
        for server in servers.values():
            run_wrk(server.url, label="warmup", concurrency=8, duration=3, script=LUA, env=wrk_env)
        for round_no in range(args.rounds):
            order = MODES[round_no % 3 :] + MODES[: round_no % 3]
            for conc in concurrency:
                for mode in order:
                    result = run_wrk(
                        servers[mode].url,
                        label=f"{mode}:create",
                        concurrency=conc,
                        duration=args.duration,
                        script=LUA,
                        env={**wrk_env, "BENCH_NONCE": str(secrets.randbelow(2**31))},
                    )
                    if result.errors:
                        raise RuntimeError(f"{mode} c={conc}: {result.errors} non-201 answers")
                    runs.setdefault((mode, conc), []).append(result)
                    log(f"round {round_no + 1} {mode} c={conc}: {result.rate:.0f} req/s")
                    time.sleep(0.5)
        micro = limiter_cost(args.redis_url, prefix)
    finally:
        for server in servers.values():
            server.stop()
        drop_database(args)
        try:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
        except Exception as exc:
            log(f"could not clean the Redis keys: {exc}")

    rows: list[dict[str, Any]] = []
    for conc in concurrency:
        row: dict[str, Any] = {"concurrency": conc}
        for mode in MODES:
            results = runs[(mode, conc)]
            row[f"{mode}_rps"] = statistics.median(r.rate for r in results)
            row[f"{mode}_p50_ms"] = statistics.median(r.p50_ms or 0 for r in results)
            row[f"{mode}_p99_ms"] = statistics.median(r.p99_ms or 0 for r in results)
        for mode in ("memory", "redis"):
            ratios = [
                limited.rate / off.rate
                for limited, off in zip(runs[(mode, conc)], runs[("off", conc)], strict=True)
            ]
            row[f"{mode}_ratio"] = statistics.median(ratios)
        rows.append(row)
    lines = [
        f"Rate limiting on the create path ({args.rounds} round(s) of {args.duration:.0f} s, "
        f"--workers {args.workers}, tracing off, {args.users} users)",
        "",
        "| c | off req/s | memory req/s | redis req/s | ratio memory/off | ratio redis/off "
        "| p50 ms off / redis | p99 ms off / redis |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['off_rps']:.0f} | {row['memory_rps']:.0f} "
            f"| {row['redis_rps']:.0f} | {row['memory_ratio']:.2f} | **{row['redis_ratio']:.2f}** "
            f"| {row['off_p50_ms']:.1f} / {row['redis_p50_ms']:.1f} "
            f"| {row['off_p99_ms']:.1f} / {row['redis_p99_ms']:.1f} |"
        )
    lines += [
        "",
        "The limiter alone, in-process, per request (hit + window read; 3,000 calls):",
        "",
        "| store | CPU us | wall us |",
        "|---|--:|--:|",
    ]
    lines += [f"| {mode} | {cpu:.0f} | {wall:.0f} |" for mode, (cpu, wall) in micro.items()]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ratelimit-latest.md").write_text(report)
    (args.results / "ratelimit-latest.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
