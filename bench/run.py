"""Benchmark of the todo-api service against PostgreSQL itself (issues 6, 10, 11).

    .venv/bin/python bench/run.py            # full run, about 10 minutes
    .venv/bin/python bench/run.py --quick    # smoke run, about 3 minutes

It creates its own database, starts the service twice with production settings (tracing on
at 100% sampling exported to a discarding OTLP sink, and tracing off; JSON logs to files),
drives it with wrk, runs pgbench with the same SQL and the reference transaction
(bench/reference/, a database of its own) in between, and prints the ratios, the list's
filters at scale and issue 10's target table. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench`, `service`, `audit` importable
    sys.path.insert(0, str(REPO))

from bench import explain, pyspy, report, seed  # noqa: E402
from bench.measure import (  # noqa: E402
    CpuMeter,
    LoadResult,
    PgTarget,
    all_procs,
    cmdline,
    descendants,
    machine_ticks,
    run_pgbench,
    run_wrk,
    status_kib,
)
from bench.report import OFF, ON, PG, REF, Run  # noqa: E402

BENCH = REPO / "bench"
LUA = BENCH / "wrk" / "ops.lua"
SQL = BENCH / "pgbench"
# A copy of ../shared/reference/pgbench/ (the reference transaction of issue 10), so that a
# fresh machine has it; --reference-dir reads another copy.
REFERENCE = BENCH / "reference"
VENV_BIN = Path(sys.executable).parent
TODO_API = VENV_BIN / "todo-api"

POOL_PREFIX = "bench-w"  # the pgbench scripts build user ids as 'bench-w' || n
LIST_USER = "bench-list"
NEIGHBOUR_USER = "bench-neighbour"
FEED_CANDIDATES = (
    "/api/{user}/audit-events?limit=50",
    "/api/{user}/audit?limit=50",
    "/api/{user}/audit/events?limit=50",
    "/api/{user}/events?limit=50",
)
HISTORY_CANDIDATES = (
    "/api/{user}/tasks/{task}/history?limit=50",
    "/api/{user}/tasks/{task}/audit?limit=50",
    "/api/{user}/tasks/{task}/events?limit=50",
    "/api/{user}/audit?entity_type=task&entity_id={task}&limit=50",
)


@dataclass(frozen=True, slots=True)
class OpSpec:
    lua_op: str
    data: str  # which users file: pool, list or one
    sql: str
    pg_vars: tuple[str, ...]
    # The runs of each round, in round 0's order (report.round_order reverses it every other
    # round). The reference transaction is the denominator of the create ratio (issue 10).
    kinds: tuple[str, ...] = (ON, PG, OFF)
    # Measured at these concurrencies only (None: --concurrency).
    concurrency: tuple[int, ...] | None = None


_TASK_VARS = ("nusers", "per_user", "first_id")
OPS = {
    "create": OpSpec("create", "pool", "create.sql", ("nusers",), kinds=(ON, REF, PG, OFF)),
    # Every create by one user at c=8: they queue on that user's chain-head row lock. Its
    # figure is its rate / the many-user create rate of the same round (issue 10).
    "create-1user": OpSpec(
        "create", "one", "create.sql", ("nusers",), kinds=(ON, PG), concurrency=(8,)
    ),
    "list": OpSpec("list", "list", "list.sql", ("list_user",)),
    "update": OpSpec("update", "pool", "update.sql", _TASK_VARS),
    "toggle": OpSpec("toggle", "pool", "toggle.sql", _TASK_VARS),
    "update-1user": OpSpec("update", "one", "update.sql", _TASK_VARS),
}
DEFAULT_OPS = "create,create-1user,list,update,toggle"


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


# --- tools --------------------------------------------------------------------------


def ensure_tool(binary: str, package: str) -> None:
    """Install a Debian package when its binary is missing (the machines run as root)."""
    if shutil.which(binary):
        return
    log(f"{binary} not found: installing the Debian package {package}")
    apt = ["apt-get", "install", "-y", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(apt, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(apt, env=env, check=True)
    if not shutil.which(binary):
        raise SystemExit(f"{binary} is still missing after installing {package}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str, url: str, token: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- processes ----------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    """One `todo-api serve` process tree (the uvicorn supervisor and its workers)."""

    name: str
    env: dict[str, str]
    log_path: Path
    workers: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cwd: Path) -> None:
        self.port = free_port()
        cmd = [str(TODO_API), "serve", "--no-migrate", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                status, _ = http("GET", self.url + "/readyz")
                if status == 200 and len(self.worker_pids()) >= self.workers:
                    time.sleep(2.0)  # let the last worker finish importing the app
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s")

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        if self.workers <= 1:
            return [self.proc.pid]
        tree = descendants(self.proc.pid, all_procs())
        return [pid for pid in tree if "spawn_main" in cmdline(pid)]

    def memory(self) -> dict[str, Any]:
        workers = []
        for pid in self.worker_pids():
            workers.append(
                {
                    "pid": pid,
                    "rss_mb": round((status_kib(pid, "VmRSS") or 0) / 1024, 1),
                    "peak_rss_mb": round((status_kib(pid, "VmHWM") or 0) / 1024, 1),
                }
            )
        return {"workers": workers, "max_rss_mb": max((w["rss_mb"] for w in workers), default=None)}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start_with_retries(server: Server, cwd: Path, retries: int, wait: float) -> None:
    """Others edit the service while the benchmark runs: a failed start is retried later."""
    for attempt in range(retries + 1):
        server.start(cwd)
        try:
            server.wait_ready()
            log(f"{server.name} ready at {server.url} (workers {server.worker_pids()})")
            return
        except RuntimeError as exc:
            log(f"{server.name} did not start ({exc}); log tail:\n{server.log_tail()}")
            server.stop()
            if attempt == retries:
                raise
            log(f"retrying in {wait:.0f}s ({attempt + 1}/{retries})")
            time.sleep(wait)


# --- the run ------------------------------------------------------------------------


@dataclass(slots=True)
class Context:
    args: argparse.Namespace
    target: PgTarget
    reference: PgTarget  # the reference transaction's own database
    work: Path  # temporary: users files with tokens, servers' working directory
    results: Path
    meter: CpuMeter
    servers: dict[str, Server] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    pg_vars: dict[str, str | int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    sink: subprocess.Popen[bytes] | None = None
    sink_port: int = 0
    runs: list[Run] = field(default_factory=list)
    scale: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seeded: dict[str, Any] = field(default_factory=dict)
    explain: list[dict[str, Any]] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per op")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--ops", default=DEFAULT_OPS, help=", ".join(OPS))
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: one short round at c=8, 10,000 tasks"
    )
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--db-name", default="todo_bench", help="(+ _ref: the reference's)")
    parser.add_argument("--reference-dir", type=Path, default=REFERENCE)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=32, help="users of the write pool")
    parser.add_argument("--pool-tasks", type=int, default=50, help="tasks per pool user")
    parser.add_argument("--list-tasks", type=int, default=1000, help="tasks of the list user")
    parser.add_argument("--scale", default="10,1000,100000", help="task counts for the scale table")
    parser.add_argument("--scale-duration", type=float, default=3.0)
    parser.add_argument(
        "--filter-duration",
        type=float,
        default=2.0,
        help="seconds of wrk (c=1) per filter and sort of the list at the largest scale",
    )
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--no-tracing-off", action="store_true", help="skip the tracing-off server")
    parser.add_argument("--feed-path", help="audit feed path, {user} filled in (default: probe)")
    parser.add_argument("--history-path", help="task history path, {user} and {task} filled in")
    parser.add_argument(
        "--profile", default="", help="ops to profile with py-spy, e.g. create,list"
    )
    parser.add_argument("--profile-duration", type=float, default=10.0)
    parser.add_argument("--profile-concurrency", type=int, default=8)
    parser.add_argument(
        "--py-spy",
        default=shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy",
        help="py-spy binary (install it outside the project, e.g. in /tmp/pyspy-venv)",
    )
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each round, wait up to this many seconds for other load to drop",
    )
    parser.add_argument("--quiet-threshold", type=float, default=20.0, help="%% of all CPUs")
    parser.add_argument("--start-retries", type=int, default=2)
    parser.add_argument("--start-retry-wait", type=float, default=60.0)
    parser.add_argument("--keep-db", action="store_true", help="keep the databases afterwards")
    parser.add_argument(
        "--gc-stats",
        action="store_true",
        help="time the servers' garbage collections (bench/gcprobe/sitecustomize.py)",
    )
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    if args.quick:
        # Every part once, briefly: a smoke check, not figures to quote.
        args.duration = min(args.duration, 2.0)
        args.rounds = 1
        args.warmup = min(args.warmup, 1.0)
        args.scale_duration = min(args.scale_duration, 1.0)
        args.filter_duration = min(args.filter_duration, 1.0)
        if args.concurrency == parser.get_default("concurrency"):
            args.concurrency = "8"
        if args.scale == parser.get_default("scale"):
            args.scale = "10,1000,10000"
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    args.ops = [op for op in str(args.ops).split(",") if op]
    for op in args.ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    args.scale = [int(n) for n in str(args.scale).split(",") if n]
    args.profile = [op for op in str(args.profile).split(",") if op]
    return args


def kinds_of(args: argparse.Namespace, op: str) -> list[str]:
    return [k for k in OPS[op].kinds if not (k == OFF and args.no_tracing_off)]


def concurrencies_of(args: argparse.Namespace, op: str) -> list[int]:
    return list(OPS[op].concurrency or args.concurrency)


def estimate_seconds(args: argparse.Namespace) -> float:
    per_run = args.duration + args.pause + 0.6
    runs = sum(len(kinds_of(args, op)) * len(concurrencies_of(args, op)) for op in args.ops)
    main = args.rounds * runs * per_run
    warm = sum(len(kinds_of(args, op)) for op in args.ops) * (args.warmup + 0.6)
    scale = 0.0
    if not args.no_scale:
        scale = (len(args.scale) * 2 + 2) * (args.scale_duration + 1)
        scale += len(explain.cases("tag0", "tag3")) * (args.filter_duration + 1.5)
    prof = len(args.profile) * (args.profile_duration + 5)
    seeded = sum(args.scale) + (0 if args.no_scale else max(args.scale))  # + the neighbour
    setup = 40 + seeded / 3_000  # servers, reference, seeding (~0.3 ms per task)
    return float(main + warm + scale + prof + setup)


def setup_database(ctx: Context, env: dict[str, str]) -> None:
    args = ctx.args
    log(f"creating database {ctx.target.dbname} and migrating it with todo-api migrate")
    seed.recreate_database(ctx.target)
    seed.migrate(TODO_API, ctx.target, env)
    started = time.monotonic()
    target = ctx.target
    pool = [seed.seed_user(target, f"{POOL_PREFIX}{k}", args.pool_tasks) for k in range(args.users)]
    base = pool[0].first_task_id
    for k, user in enumerate(pool):
        if user.first_task_id != base + k * args.pool_tasks:
            raise RuntimeError("pool task ids are not contiguous across users")
    list_user = seed.seed_user(target, LIST_USER, args.list_tasks)
    scale_users = {args.list_tasks: list_user}
    for n in args.scale if not args.no_scale else []:
        if n not in scale_users:
            scale_users[n] = seed.seed_user(target, f"bench-s{n}", n)
    if not args.no_scale:
        # The largest user is not the whole table: a second user of the same size, as in a
        # database of many users, so a count of half of its tasks is planned as it would be
        # there (one user holding 95% of `tasks` makes reading the table the cheaper plan).
        seed.seed_user(target, NEIGHBOUR_USER, max(args.scale))
    seed.vacuum_analyze(ctx.target)
    log(f"seeded in {time.monotonic() - started:.1f}s: {seed.counts(ctx.target)}")
    ctx.pg_vars = {
        "nusers": args.users,
        "per_user": args.pool_tasks,
        "first_id": base,
        "list_user": LIST_USER,
    }
    ctx.seeded = {
        "pool": {"users": args.users, "tasks_per_user": args.pool_tasks, "first_id": base},
        "list_user": {"user": LIST_USER, "tasks": args.list_tasks},
        "scale_users": {
            str(n): {"user": u.user_id, "first_id": u.first_task_id, "tasks": u.task_count}
            for n, u in scale_users.items()
        },
    }


def setup_reference(ctx: Context) -> None:
    """The reference transaction's own database, made by its schema file (100,000 tasks)."""
    schema = ctx.args.reference_dir / "reference-schema.sql"
    log(f"creating database {ctx.reference.dbname} from {schema}")
    seed.recreate_database(ctx.reference)
    env = {**os.environ, **ctx.reference.env(), "PGOPTIONS": "-c client_min_messages=warning"}
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", ctx.reference.host]
    cmd += ["-p", str(ctx.reference.port), "-U", ctx.reference.user]
    cmd += ["-d", ctx.reference.dbname, "-f", str(schema)]
    subprocess.run(cmd, env=env, stdout=sys.stderr, check=True, timeout=300)


def make_tokens(ctx: Context, env: dict[str, str], users: list[str]) -> None:
    """The first token through `todo-api dev-token` (the CLI path), the rest in-process.

    The CLI takes ~2 s per call (it imports Alembic); dozens of users would cost a minute of
    the 2 CPUs, so the others are signed by the same function the CLI calls.
    """
    from service.auth import create_dev_token

    ttl = 6 * 3600
    first = subprocess.run(
        [str(TODO_API), "dev-token", users[0], "--ttl", str(ttl)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    ctx.tokens[users[0]] = first.stdout.strip()
    secret = env["BETTER_AUTH_SECRET"]
    for user in users[1:]:
        ctx.tokens[user] = create_dev_token(secret, user, ttl_seconds=ttl)


def write_users_files(ctx: Context) -> None:
    pool = ctx.seeded["pool"]
    lines = []
    for k in range(pool["users"]):
        user = f"{POOL_PREFIX}{k}"
        first = pool["first_id"] + k * pool["tasks_per_user"]
        lines.append(f"{user}\t{ctx.tokens[user]}\t{first}\t{pool['tasks_per_user']}")
    ctx.data["pool"] = ctx.work / "pool.tsv"
    ctx.data["pool"].write_text("\n".join(lines) + "\n")
    ctx.data["one"] = ctx.work / "one.tsv"
    ctx.data["one"].write_text(lines[0] + "\n")
    list_user = ctx.seeded["scale_users"][str(ctx.args.list_tasks)]
    ctx.data["list"] = ctx.work / "list.tsv"
    ctx.data["list"].write_text(
        f"{LIST_USER}\t{ctx.tokens[LIST_USER]}\t{list_user['first_id']}\t{list_user['tasks']}\n"
    )


def server_envs(ctx: Context, base: dict[str, str], secret: str) -> dict[str, dict[str, str]]:
    common = {
        **base,
        "APP_ENV": "production",
        "DATABASE_URL": seed.database_url(ctx.target),
        "BETTER_AUTH_SECRET": secret,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "OTEL_SERVICE_NAME": "todo-api",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=bench",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "PYTHONUNBUFFERED": "1",
        # The figures are the cost of a request against pgbench's; a few users' thousands of
        # requests a second would be refused with 429. bench/ratelimit.py measures the limiter.
        "RATE_LIMIT_ENABLED": "false",
    }
    on = {
        **common,
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ctx.sink_port}",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{ctx.sink_port}/v1/traces",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
    }
    off = {**common, "OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none"}
    return {ON: on, OFF: off}


def sink_stats(ctx: Context) -> dict[str, Any] | None:
    try:
        status, body = http("GET", f"http://127.0.0.1:{ctx.sink_port}/stats")
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def sanity(ctx: Context, server: Server) -> None:
    """One request of each kind, so a broken start fails here and not as 100% errors."""
    pool_user = f"{POOL_PREFIX}0"
    token = ctx.tokens[pool_user]
    base = f"{server.url}/api/{pool_user}/tasks"
    task = ctx.seeded["pool"]["first_id"]
    checks = [
        ("POST", base, {"title": "sanity check", "description": "bench"}),
        ("GET", base + "?limit=50", None),
        ("PUT", f"{base}/{task}", {"title": f"sanity {secrets.token_hex(4)}"}),
        ("PATCH", f"{base}/{task}/complete", None),
    ]
    for method, url, body in checks:
        status, payload = http(method, url, token, body)
        if status >= 300:
            raise RuntimeError(f"{server.name}: {method} {url} -> {status}: {payload[:500]!r}")
    other = f"{POOL_PREFIX}1"
    status, payload = http("GET", f"{server.url}/api/{other}/tasks?limit=1", ctx.tokens[other])
    if status != 200:
        raise RuntimeError(f"{server.name}: in-process token refused: {status} {payload[:300]!r}")


def check_seeded_chain(ctx: Context, server: Server) -> None:
    """The seeded chains are real: the service's own verify endpoint must accept one."""
    url = f"{server.url}/api/{LIST_USER}/audit-events/verify"
    status, body = http("GET", url, ctx.tokens[LIST_USER])
    if status == 404:
        ctx.notes.append("seeded chain not checked: no /audit-events/verify endpoint")
        return
    ok = status == 200 and json.loads(body).get("ok") is True
    ctx.notes.append(
        f"seeded audit chain of {LIST_USER} ({ctx.args.list_tasks} events) "
        + ("verifies" if ok else f"does NOT verify: {status} {body[:300]!r}")
    )
    log(ctx.notes[-1])


def wrk_op(ctx: Context, server: Server, op: str, conc: int, duration: float) -> LoadResult:
    spec = OPS[op]
    env = {
        "BENCH_OP": spec.lua_op,
        "BENCH_DATA": str(ctx.data[spec.data]),
        "BENCH_NONCE": str(secrets.randbelow(2**31)),
    }
    return run_wrk(
        server.url,
        label=f"{server.name}:{op}",
        concurrency=conc,
        duration=duration,
        script=LUA,
        env=env,
        meter=ctx.meter,
    )


def pgbench_op(
    ctx: Context, op: str, conc: int, duration: float, *, reference: bool = False, **extra: Any
) -> LoadResult:
    """pgbench with the service's SQL for `op`, or with the reference transaction."""
    spec = OPS[op]
    variables = {name: ctx.pg_vars[name] for name in spec.pg_vars}
    if spec.data == "one":
        variables["nusers"] = 1
    variables.update(extra)
    if reference:
        # As the reference README runs it: -c 8 -j 2 (-j at most -c), no variables.
        target, script, label, threads = ctx.reference, "reference-create.sql", "reference", 2
        script_path, variables = ctx.args.reference_dir / script, {}
    else:
        target, script_path, label, threads = ctx.target, SQL / spec.sql, f"pgbench:{op}", 1
    # PostgreSQL's 100 connections are shared with the servers' pools and with whatever else
    # runs here (test suites): wait for room rather than fail the whole run.
    for attempt in range(7):
        try:
            return run_pgbench(
                target,
                script_path,
                label=label,
                concurrency=conc,
                duration=duration,
                variables=variables,
                meter=ctx.meter,
                threads=threads,
            )
        except RuntimeError as exc:
            if "too many clients" not in str(exc) or attempt == 6:
                raise
            log(f"pgbench c={conc}: PostgreSQL has no free connection slots; retrying in 10s")
            time.sleep(10)
    raise AssertionError("unreachable")


def other_load(seconds: float = 2.0) -> float:
    """% of all CPUs busy while the benchmark itself is idle: someone else's load."""
    busy0, total0 = machine_ticks()
    time.sleep(seconds)
    busy1, total1 = machine_ticks()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet(ctx: Context, when: str) -> None:
    args = ctx.args
    deadline = time.monotonic() + args.wait_quiet
    while True:
        load = other_load()
        if load <= args.quiet_threshold:
            return
        if time.monotonic() >= deadline:
            ctx.notes.append(f"{when}: other processes used {load:.0f}% of the CPUs")
            log(ctx.notes[-1] + " (measuring anyway; ratios are less affected than rates)")
            return
        log(f"{when}: other processes use {load:.0f}% of the CPUs; waiting")
        time.sleep(10)


def run_kind(ctx: Context, kind: str, op: str, conc: int, duration: float) -> LoadResult:
    if kind in (PG, REF):
        return pgbench_op(ctx, op, conc, duration, reference=kind == REF)
    return wrk_op(ctx, ctx.servers[kind], op, conc, duration)


def measure(ctx: Context) -> None:
    """Each op at each concurrency, each kind of run once per round, in alternating order."""
    args = ctx.args
    wait_for_quiet(ctx, "before warm-up")
    log(f"warm-up: {args.warmup:g}s per op and kind of run")
    for op in args.ops:
        for kind in kinds_of(args, op):
            run_kind(ctx, kind, op, 8, max(1.0, args.warmup))
    for rnd in range(args.rounds):
        if rnd:
            wait_for_quiet(ctx, f"before round {rnd}")
        for op in args.ops:
            for conc in concurrencies_of(args, op):
                for kind in report.round_order(kinds_of(args, op), rnd):
                    time.sleep(args.pause)
                    result = run_kind(ctx, kind, op, conc, args.duration)
                    ctx.runs.append(Run(op, conc, rnd, kind, result))
                    _log_run(rnd, op, kind, result)


def _log_run(rnd: int, op: str, kind: str, r: LoadResult) -> None:
    group = report.SERVER_GROUP.get(kind)
    app = r.cpu_ms_per_req(group) if group else None
    pg = r.cpu_ms_per_req("postgres")
    lat = (
        f"p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms"
        if r.p99_ms is not None
        else (f"avg {r.avg_ms:.2f} ms" if r.avg_ms is not None else "")
    )
    cpu = (f"app {app:.2f} " if app is not None else "") + (f"pg {pg:.2f}" if pg else "")
    errors = f" ERRORS {r.errors}" if r.errors else ""
    log(
        f"r{rnd} {op:<12} c={r.concurrency:<2} {kind:<11} {r.rate:8.0f}/s {lat}"
        f"  cpu ms/req {cpu}  busy {r.machine_busy_pct:.0f}% other {r.other_load_pct:.0f}%"
        f"{errors}"
    )


def probe(server: Server, token: str, candidates: tuple[str, ...], **fill: Any) -> str | None:
    for candidate in candidates:
        path = candidate.format(**fill)
        status, _ = http("GET", server.url + path, token)
        if status == 200:
            return candidate
    return None


def measure_scale(ctx: Context) -> None:
    args = ctx.args
    server = ctx.servers[ON]
    duration = args.scale_duration
    for n in args.scale:
        info = ctx.seeded["scale_users"][str(n)]
        user, token = info["user"], ctx.tokens[info["user"]]
        res = run_wrk(
            f"{server.url}/api/{user}/tasks?limit=50",
            label=f"scale:list:{n}",
            concurrency=1,
            duration=duration,
            headers=[f"Authorization: Bearer {token}"],
            meter=ctx.meter,
        )
        pg = pgbench_op(ctx, "list", 1, duration, list_user=user)
        note = "page of 50 carrying the user's task count" if n > 50 else "one page, no count"
        ctx.scale.append(
            {
                "case": f"list 50 tasks (user with {n:,} tasks)",
                "rows": n,
                "result": res.as_json(),
                "pgbench": pg.as_json(),
                "note": note,
            }
        )
        log(
            f"scale list n={n}: p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} ms; "
            f"pgbench avg {pg.avg_ms} ms"
        )
    big = max(args.scale)
    info = ctx.seeded["scale_users"][str(big)]
    user, token = info["user"], ctx.tokens[info["user"]]
    task = info["first_id"] + info["tasks"] // 2
    for i in range(5):  # a task with a few more events than its creation
        http("PUT", f"{server.url}/api/{user}/tasks/{task}", token, {"title": f"history {i}"})
    events = info["tasks"] + 5
    feed = args.feed_path or probe(server, token, FEED_CANDIDATES, user=user)
    history = args.history_path or probe(server, token, HISTORY_CANDIDATES, user=user, task=task)
    for case, path in (("audit feed, first page", feed), ("task history", history)):
        entry: dict[str, Any] = {"case": f"{case} (user with {events:,} events)", "rows": events}
        if path is None:
            entry["note"] = "endpoint not found (probed: see bench/run.py); not measured"
            ctx.notes.append(f"{case}: no endpoint answered 200, so it was not measured")
        else:
            url = server.url + path.format(user=user, task=task)
            res = run_wrk(
                url,
                label=f"scale:{case}",
                concurrency=1,
                duration=duration,
                headers=[f"Authorization: Bearer {token}"],
                meter=ctx.meter,
            )
            entry["result"] = res.as_json()
            entry["note"] = f"`{path}`" + (f", {res.errors} errors!" if res.errors else "")
            log(f"scale {case}: p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} ms")
        ctx.scale.append(entry)


def measure_filters(ctx: Context) -> None:
    """Every filter and sort of the list for the largest user: its plans, then its HTTP time.

    The run's writes left the tables' statistics and visibility maps stale (no autovacuum has
    caught up within the run), which turns index-only counts into heap reads; a VACUUM ANALYZE
    first plans them as a database in its steady state would.
    """
    args = ctx.args
    seed.vacuum_analyze(ctx.target)
    big = ctx.seeded["scale_users"][str(max(args.scale))]["user"]
    ctx.explain = explain.run(seed.database_url(ctx.target), big)
    server = ctx.servers[ON]
    for case in ctx.explain:
        res = run_wrk(
            f"{server.url}/api/{big}/tasks?{case['query']}",
            label=f"filter:{case['case']}",
            concurrency=1,
            duration=args.filter_duration,
            headers=[f"Authorization: Bearer {ctx.tokens[big]}"],
            meter=ctx.meter,
        )
        case.update(http_p50_ms=res.p50_ms, http_p99_ms=res.p99_ms, http_rate=res.rate)
        case["http_errors"] = res.errors
        if res.errors:
            ctx.notes.append(f"list `{case['query']}`: {res.errors} errors (non-2xx or socket)")
        log(f"filter {case['case']}: p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} ms")
    ctx.notes += [
        f"at {max(args.scale):,} tasks, {note}" for note in explain.unindexed(ctx.explain)
    ]


def profile_ops(ctx: Context) -> None:
    args = ctx.args
    spy = Path(args.py_spy)
    if not spy.exists():
        ctx.notes.append(f"profiling skipped: py-spy not found at {spy}")
        log(ctx.notes[-1])
        return
    server = ctx.servers[ON]
    assert server.proc is not None
    for op in args.profile:
        out = ctx.results / f"profile-{op}.txt"
        # --gil: only the thread holding the GIL, i.e. a worker's Python CPU (see pyspy.py).
        options = "--subprocesses --gil --nonblocking --nolineno --full-filenames --rate 250"
        cmd = [str(spy), "record", "--pid", str(server.proc.pid), *options.split()]
        cmd += ["--format", "raw", "--duration", str(round(args.profile_duration + 2))]
        cmd += ["-o", str(out)]
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        result = wrk_op(ctx, server, op, args.profile_concurrency, args.profile_duration)
        _, err = spy_proc.communicate(timeout=args.profile_duration + 60)
        if spy_proc.returncode != 0 or not out.exists():
            ctx.notes.append(f"py-spy failed for {op}: {err.decode(errors='replace')[-300:]}")
            log(ctx.notes[-1])
            continue
        summary = pyspy.markdown(pyspy.load(out), result.cpu_ms_per_req("server_on"))
        ctx.profiles[op] = (
            f"py-spy on both workers, {op} at c={args.profile_concurrency} for "
            f"{args.profile_duration:g}s ({result.rate:.0f} req/s while sampled; raw stacks "
            f"in bench/results/{out.name})\n\n{summary}"
        )
        log(f"profiled {op}: bench/results/{out.name}")


def gc_summary(folder: Path) -> dict[str, Any]:
    """Collections and pauses per generation, summed over the workers."""
    merged: dict[str, dict[str, Any]] = {}
    bounds: list[float] = []
    for path in folder.glob("gc-*.json"):
        data = json.loads(path.read_text())
        gens = data["generations"]
        if sum(g["count"] for g in gens.values()) < 100:
            continue  # the supervisor or the resource tracker, idle
        bounds = data["bounds_ms"]
        for gen, g in gens.items():
            into = merged.setdefault(
                gen,
                {
                    "count": 0,
                    "total_ms": 0.0,
                    "max_ms": 0.0,
                    "histogram": [0] * len(g["histogram"]),
                },
            )
            into["count"] += g["count"]
            into["total_ms"] += g["total_ms"]
            into["max_ms"] = max(into["max_ms"], g["max_ms"])
            into["histogram"] = [
                a + b for a, b in zip(into["histogram"], g["histogram"], strict=True)
            ]
    for g in merged.values():
        g["total_ms"] = round(g["total_ms"], 1)
        g["max_ms"] = round(g["max_ms"], 1)
        g["over_5ms"] = sum(g["histogram"][bounds.index(5) + 1 :]) if 5 in bounds else None
        # The median's histogram bucket, as "<= bound".
        half, seen = g["count"] / 2, 0
        for bound, n in zip([*bounds, float("inf")], g["histogram"], strict=True):
            seen += n
            if seen >= half:
                g["p50_ms"] = f"<= {bound:g}" if bound != float("inf") else f"> {bounds[-1]:g}"
                break
    return merged


def log_file_check(path: Path) -> dict[str, Any]:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    parsed = 0
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                parsed += 1
        except ValueError:
            pass
    return {
        "file": path.name,
        "lines": len(lines),
        "json_lines": parsed,
        "first": lines[0][:300] if lines else None,
    }


def git_info() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True)
        return proc.stdout.strip()

    return {
        "commit": run("rev-parse", "--short", "HEAD"),
        "dirty_files": len(run("status", "--porcelain").splitlines()),
    }


def write_report(ctx: Context, extra: dict[str, Any]) -> str:
    args = ctx.args
    rows = report.summarize(ctx.runs)
    rss = extra.get("memory", {}).get(ON, {}).get("max_rss_mb")
    checks = report.issue_targets(ctx.runs, rows, rss)
    spans = extra.get("spans_per_request")
    parts = [
        f"# todo-api benchmark — {extra['finished']}",
        "",
        f"`.venv/bin/python bench/run.py {' '.join(extra['argv'])}`".replace(" `", "`"),
        f"— {len(ctx.runs)} measured runs, {args.rounds} round(s) of {args.duration:g}s, "
        f"{args.workers} workers, commit {extra['git']['commit']}"
        f" ({extra['git']['dirty_files']} files changed in the tree), "
        f"{os.cpu_count()} CPUs, {extra['postgres']}.",
        "",
        "## Targets (issue 10)",
        "",
        "2 workers, tracing on (100% sampling, OTLP/HTTP to a discarding local sink), JSON logs "
        "on. *today* is issue 10's baseline (bench/report.py `TODAY`); each ratio is taken "
        "within a round and the median of the rounds is shown.",
        "",
        report.targets_table(checks),
        "",
        "## Service and pgbench",
        "",
        "Service: tracing on (100% sampling, OTLP/HTTP to a discarding local sink), JSON logs "
        "to a file. pgbench: the same statements (a write's in one transaction), "
        "`-M prepared`, same -c. "
        "**ratio** = service req/s / pgbench TPS in the same round (median of rounds). "
        "**ratio to reference** = service req/s / TPS of the reference transaction "
        "(bench/reference/: a task row and an audit row, its own database, `-j 2`), same round. "
        "`create-1user`: every create by one user. CPU ms/req = CPU of the server's processes + "
        "of the PostgreSQL backends of the bench databases and the WAL writer, checkpointer and "
        "background writer, per request. Tracing cost = 1 - (req/s on / req/s off), and CPU per "
        "request on / off - 1.",
        "",
        report.main_table(rows),
        "",
    ]
    if ctx.scale:
        parts += ["## Scale (tracing on, c=1)", "", report.scale_table(ctx.scale), ""]
    if ctx.explain:
        big = max(ctx.args.scale)
        parts += [
            f"## The list's filters and sorts at {big:,} tasks",
            "",
            f"HTTP: `GET /api/{{user}}/tasks?...&limit=50`, tracing on, wrk c=1 for "
            f"{args.filter_duration:g}s each. Plans and times: EXPLAIN ANALYZE of the service's "
            "statements; the count (`X-Total-Count`) runs only when the page is full, and an "
            "unfiltered list reads `users.task_count`.",
            "",
            explain.table(ctx.explain),
            "",
        ]
    mem = extra.get("memory", {})
    parts += ["## Memory and checks", ""]
    for kind in (ON, OFF):
        if kind in mem:
            workers = ", ".join(
                f"{w['rss_mb']:.0f} MB (peak {w['peak_rss_mb']:.0f})" for w in mem[kind]["workers"]
            )
            parts.append(f"- Worker RSS after the run, {kind}: {workers}")
    sink = extra.get("sink") or {}
    parts.append(
        f"- OTLP sink: {sink.get('requests', 0)} exports, {sink.get('spans')} spans, "
        f"{sink.get('bytes', 0) / 1e6:.1f} MB"
        + (f" = {spans:.1f} spans per request sent to the tracing-on server" if spans else "")
    )
    for kind, gens in (extra.get("gc") or {}).items():
        text = "; ".join(
            f"gen{gen} {g['count']}x, median {g.get('p50_ms')} ms, max {g['max_ms']} ms, "
            f"{g['over_5ms']} over 5 ms, {g['total_ms'] / 1000:.1f} s in all"
            for gen, g in gens.items()
            if g["count"]
        )
        parts.append(f"- GC pauses, {kind} workers (whole run): {text}")
    for check in extra.get("logs", []):
        parts.append(
            f"- Log file {check['file']}: {check['lines']} lines, {check['json_lines']} JSON"
        )
    parts += [f"- {note}" for note in ctx.notes]
    parts.append("")
    for op, text in ctx.profiles.items():
        parts += [f"## Profile: {op}", "", text, ""]
    markdown = "\n".join(parts)
    payload = {
        **extra,
        "rows": rows,
        "scale": ctx.scale,
        "explain": ctx.explain,
        "targets": checks,
        "notes": ctx.notes,
        "seeded": ctx.seeded,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx.results.mkdir(parents=True, exist_ok=True)
    for name in ("latest", f"run-{stamp}"):
        (ctx.results / f"{name}.md").write_text(markdown + "\n")
        (ctx.results / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    return markdown


def postgres_version(target: PgTarget) -> str:
    conn = seed.connect(target, "postgres")
    with conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        version = str(cur.fetchone()[0]).split()[0]
    conn.close()
    return f"PostgreSQL {version}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tool("wrk", "wrk")
    ensure_tool("pgbench", "postgresql-client")
    ensure_tool("psql", "postgresql-client")
    target = seed.pg_target(args.pg_url, args.db_name)
    reference = seed.pg_target(args.pg_url, f"{args.db_name}_ref")
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="todo-bench-"))
    ctx = Context(
        args=args,
        target=target,
        reference=reference,
        work=work,
        results=results,
        meter=CpuMeter(target.dbname, reference.dbname),
    )
    log(f"estimated time: {estimate_seconds(args) / 60:.1f} min")
    base_env = seed.clean_env()
    secret = secrets.token_urlsafe(48)
    cli_env = {
        **base_env,
        "APP_ENV": "production",
        "BETTER_AUTH_SECRET": secret,
        "DATABASE_URL": seed.database_url(target),
    }
    started = time.monotonic()
    extra: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv}
    try:
        if any(REF in kinds_of(args, op) for op in args.ops):
            setup_reference(ctx)
        setup_database(ctx, cli_env)
        users = [f"{POOL_PREFIX}{k}" for k in range(args.users)] + [LIST_USER]
        users += [u["user"] for u in ctx.seeded["scale_users"].values() if u["user"] not in users]
        make_tokens(ctx, cli_env, users)
        write_users_files(ctx)

        ctx.sink_port = free_port()
        sink_cmd = [sys.executable, str(BENCH / "otlp_sink.py"), "--port", str(ctx.sink_port)]
        ctx.sink = subprocess.Popen(sink_cmd, cwd=work, start_new_session=True)
        ctx.meter.watch_tree("otlp_sink", ctx.sink.pid)
        envs = server_envs(ctx, base_env, secret)
        if args.gc_stats:
            for kind, env in envs.items():
                gc_dir = work / f"gc-{kind}"
                gc_dir.mkdir()
                paths = [str(BENCH / "gcprobe"), env.get("PYTHONPATH", "")]
                env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
                env["BENCH_GC_DIR"] = str(gc_dir)
        for kind in [ON] if args.no_tracing_off else [ON, OFF]:
            name = "tracing-on" if kind == ON else "tracing-off"
            log_path = results / f"server-{name}.log"
            log_path.unlink(missing_ok=True)
            server = Server(name, envs[kind], log_path, args.workers)
            ctx.servers[kind] = server
            start_with_retries(server, work, args.start_retries, args.start_retry_wait)
            assert server.proc is not None
            ctx.meter.watch_tree(report.SERVER_GROUP[kind], server.proc.pid)
            sanity(ctx, server)
        check_seeded_chain(ctx, ctx.servers[ON])

        measure(ctx)
        if not args.no_scale:
            measure_scale(ctx)
            measure_filters(ctx)
        if args.profile:
            profile_ops(ctx)
        extra["memory"] = {kind: server.memory() for kind, server in ctx.servers.items()}
        if args.gc_stats:
            time.sleep(1.5)  # the probe writes its totals at most once a second
            extra["gc"] = {kind: gc_summary(work / f"gc-{kind}") for kind in ctx.servers}
    finally:
        for server in ctx.servers.values():
            server.stop()
        time.sleep(1.0)  # the exporter flushes on shutdown
        extra["sink"] = sink_stats(ctx) if ctx.sink else None
        if ctx.sink is not None:
            ctx.sink.terminate()
            ctx.sink.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_db:
            for database in (target, reference):
                try:
                    seed.drop_database(database)
                except Exception as exc:
                    log(f"could not drop {database.dbname}: {exc}")

    sent_on = sum(r.result.requests for r in ctx.runs if r.kind == ON)
    sent_on += sum(int(c.get("result", {}).get("requests", 0)) for c in ctx.scale)
    sink = extra["sink"] or {}
    extra["spans_per_request"] = sink["spans"] / sent_on if sink.get("spans") and sent_on else None
    if ON in ctx.servers and not sink.get("requests"):
        ctx.notes.append(
            "WARNING: the tracing-on server exported nothing to the OTLP sink: tracing is not "
            "wired to the OTEL_* variables yet, so 'tracing on' measured the service untraced."
        )
    extra["logs"] = [log_file_check(s.log_path) for s in ctx.servers.values()]
    for check in extra["logs"]:
        if check["lines"] and check["json_lines"] < check["lines"]:
            ctx.notes.append(
                f"{check['file']}: {check['lines'] - check['json_lines']} of {check['lines']} "
                "log lines are not JSON"
            )
    extra["git"] = git_info()
    extra["postgres"] = postgres_version(target)
    extra["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    extra["elapsed_s"] = round(time.monotonic() - started)
    print(write_report(ctx, extra))
    log(f"done in {extra['elapsed_s'] / 60:.1f} min; bench/results/latest.md and latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
