"""Running wrk and pgbench, reading their figures, and charging CPU time to processes via /proc.

CPU is read from /proc/<pid>/stat (utime + stime of all threads) so the harness adds no
dependency. The 2 CPUs are shared with whatever else runs here, so each run also records the
share of the machine used by processes outside the benchmark ("other load").
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- /proc ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    cpu_ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime (reaped children)
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: it ends at the last ')'.
    rparen = data.rindex(")")
    comm = data[data.index("(") + 1 : rparen]
    fields = data[rparen + 2 :].split()
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        comm=comm,
        cpu_ticks=int(fields[11]) + int(fields[12]),
        child_ticks=int(fields[13]) + int(fields[14]),
        rss_bytes=int(fields[21]) * PAGE_SIZE,
    )


def all_procs() -> dict[int, ProcStat]:
    procs: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                procs[stat.pid] = stat
    return procs


def descendants(root: int, procs: Mapping[int, ProcStat]) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in procs.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in procs:
            found.append(pid)
            stack.extend(children.get(pid, []))
    return found


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` line of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


_PG_TITLE = re.compile(r"^postgres: (?:[^ ]+: )?")


class CpuMeter:
    """Charges CPU to named groups: each server's process tree, and the benchmark database.

    PostgreSQL is shared with whatever else runs on the machine (other test suites), so only
    the backends connected to our databases count, plus the shared writers (WAL writer,
    checkpointer, background writer). Backends can exit during a run (pgbench's at its end,
    pool overflow connections), so `poll()` is called while a load runs and keeps each
    backend's last reading.
    """

    AUX = frozenset({"checkpointer", "background writer", "walwriter"})

    def __init__(self, *dbnames: str) -> None:
        self.dbnames = frozenset(dbnames)
        self.trees: dict[str, int] = {}
        self._titles: dict[int, str] = {}

    def watch_tree(self, name: str, root_pid: int) -> None:
        self.trees[name] = root_pid

    def _title(self, pid: int) -> str:
        if pid not in self._titles:
            self._titles[pid] = cmdline(pid)
        return self._titles[pid]

    def _postgres(self, procs: Mapping[int, ProcStat]) -> tuple[dict[int, int], int]:
        """Our database's backends (pid -> ticks) and the shared writers' ticks."""
        pg_pids = {pid for pid, stat in procs.items() if stat.comm == "postgres"}
        ours: dict[int, int] = {}
        aux = 0
        for pid in pg_pids:
            stat = procs[pid]
            if stat.ppid not in pg_pids:
                continue  # the postmaster
            # "postgres: [cluster: ]user database host(port) state", or the process's role.
            title = _PG_TITLE.sub("", self._title(pid))
            parts = title.split()
            if len(parts) >= 3 and parts[1] in self.dbnames:
                ours[pid] = stat.cpu_ticks
            elif title in self.AUX:
                aux += stat.cpu_ticks
        return ours, aux

    def begin(self) -> Sample:
        self._titles.clear()
        procs = all_procs()
        ours, aux = self._postgres(procs)
        busy, total = machine_ticks()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return Sample(
            trees={name: self._tree_ticks(root, procs) for name, root in self.trees.items()},
            db_first=dict(ours),
            db_last=dict(ours),
            aux=aux,
            machine_busy=busy,
            machine_total=total,
            children_s=children.ru_utime + children.ru_stime,
            self_s=me.ru_utime + me.ru_stime,
            at=time.monotonic(),
        )

    def _tree_ticks(self, root: int, procs: Mapping[int, ProcStat]) -> int:
        return sum(procs[pid].cpu_ticks for pid in descendants(root, procs))

    def poll(self, sample: Sample) -> dict[int, ProcStat]:
        procs = all_procs()
        ours, _ = self._postgres(procs)
        for pid, ticks in ours.items():
            sample.db_first.setdefault(pid, 0)  # born during the run: all of its CPU counts
            sample.db_last[pid] = ticks
        return procs

    def end(self, sample: Sample) -> CpuDelta:
        procs = self.poll(sample)
        _, aux = self._postgres(procs)
        busy, total = machine_ticks()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        tick_ms = 1000.0 / CLK_TCK
        ms = {
            name: (self._tree_ticks(root, procs) - sample.trees[name]) * tick_ms
            for name, root in self.trees.items()
        }
        backends = sum(last - sample.db_first[pid] for pid, last in sample.db_last.items())
        ms["postgres"] = (backends + aux - sample.aux) * tick_ms
        wall = time.monotonic() - sample.at
        loadgen = (children.ru_utime + children.ru_stime - sample.children_s) * 1000.0
        harness = (me.ru_utime + me.ru_stime - sample.self_s) * 1000.0
        busy_ms = (busy - sample.machine_busy) * tick_ms
        other = busy_ms - sum(ms.values()) - loadgen - harness
        capacity = wall * 1000.0 * (os.cpu_count() or 1)
        return CpuDelta(
            ms=ms,
            machine_busy_pct=100.0 * (busy - sample.machine_busy) / (total - sample.machine_total)
            if total > sample.machine_total
            else 0.0,
            other_pct=max(0.0, 100.0 * other / capacity) if capacity else 0.0,
            loadgen_ms=loadgen,
            wall_s=wall,
        )


@dataclass(slots=True)
class Sample:
    trees: dict[str, int]
    db_first: dict[int, int]
    db_last: dict[int, int]
    aux: int
    machine_busy: int
    machine_total: int
    children_s: float  # waited-for children of this process: wrk, pgbench
    self_s: float
    at: float


@dataclass(slots=True)
class CpuDelta:
    ms: dict[str, float]  # CPU milliseconds per group during the interval
    machine_busy_pct: float  # of all cores
    other_pct: float  # of all cores, used by processes that are not part of the benchmark
    loadgen_ms: float  # wrk or pgbench itself
    wall_s: float


def run_measured(
    cmd: list[str], env: Mapping[str, str], timeout: float, meter: CpuMeter | None
) -> tuple[subprocess.CompletedProcess[str], CpuDelta | None]:
    """Run a load generator, polling the CPU meter every quarter second while it runs."""
    sample = meter.begin() if meter else None
    proc = subprocess.Popen(
        cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                raise RuntimeError(f"{cmd[0]} timed out:\n{out}\n{err}") from None
            if meter and sample:
                meter.poll(sample)
    delta = meter.end(sample) if meter and sample else None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), delta


# --- wrk ------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(slots=True)
class LoadResult:
    """One wrk or pgbench run, with the CPU charged during it."""

    tool: str
    label: str
    concurrency: int
    duration_s: float
    requests: int
    rate: float  # req/s or TPS
    p50_ms: float | None = None
    p99_ms: float | None = None
    avg_ms: float | None = None
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # ms per group
    machine_busy_pct: float = 0.0
    other_load_pct: float = 0.0
    loadgen_cpu_ms: float = 0.0
    raw: str = ""

    def cpu_ms_per_req(self, group: str) -> float | None:
        if not self.requests or group not in self.cpu:
            return None
        return self.cpu[group] / self.requests

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("raw")
        return data


def parse_wrk(output: str) -> dict[str, Any]:
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.M)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    if not requests or not rate:
        raise ValueError("wrk printed no summary:\n" + output)
    latencies = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)\s*$", output, re.M))
    avg = re.search(r"^\s+Latency\s+([\d.]+\w+)", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if sockets:
        errors += sum(int(x) for x in sockets.groups())
    return {
        "requests": int(requests.group(1)),
        "rate": float(rate.group(1)),
        "p50_ms": _ms(latencies["50"]) if "50" in latencies else None,
        "p99_ms": _ms(latencies["99"]) if "99" in latencies else None,
        "avg_ms": _ms(avg.group(1)) if avg else None,
        "errors": errors,
    }


def run_wrk(
    url: str,
    *,
    label: str,
    concurrency: int,
    duration: float,
    script: Path | None = None,
    env: Mapping[str, str] | None = None,
    headers: Iterable[str] = (),
    meter: CpuMeter | None = None,
) -> LoadResult:
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for header in headers:
        cmd += ["-H", header]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    proc, delta = run_measured(cmd, {**os.environ, **(env or {})}, seconds + 60, meter)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    parsed = parse_wrk(proc.stdout)
    result = LoadResult(
        tool="wrk", label=label, concurrency=concurrency, duration_s=seconds, **parsed
    )
    result.raw = proc.stdout
    if delta:
        _charge(result, delta)
    return result


# --- pgbench --------------------------------------------------------------------------


def parse_pgbench(output: str) -> dict[str, Any]:
    tps = re.search(r"^tps = ([\d.]+)", output, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", output)
    if not tps or not done:
        raise ValueError("pgbench printed no summary:\n" + output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    avg = re.search(r"latency average = ([\d.]+) ms", output)
    return {
        "requests": int(done.group(1)),
        "rate": float(tps.group(1)),
        "avg_ms": float(avg.group(1)) if avg else None,
        "errors": int(failed.group(1)) if failed else 0,
    }


@dataclass(frozen=True, slots=True)
class PgTarget:
    host: str
    port: int
    user: str
    password: str | None
    dbname: str

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}


def run_pgbench(
    target: PgTarget,
    script: Path,
    *,
    label: str,
    concurrency: int,
    duration: float,
    variables: Mapping[str, str | int],
    meter: CpuMeter | None = None,
    threads: int = 1,
) -> LoadResult:
    # -j 1 by default: one thread, like wrk -t1; -n: no vacuum of pgbench's own tables (there
    # are none).
    cmd = [
        "pgbench",
        "-n",
        "-M",
        "prepared",
        "-f",
        str(script),
        "-c",
        str(concurrency),
        "-j",
        str(max(1, min(threads, concurrency))),
        "-T",
        str(max(1, round(duration))),
        "-h",
        target.host,
        "-p",
        str(target.port),
        "-U",
        target.user,
    ]
    for name, value in variables.items():
        cmd += ["-D", f"{name}={value}"]
    cmd.append(target.dbname)
    proc, delta = run_measured(cmd, {**os.environ, **target.env()}, duration + 60, meter)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    parsed = parse_pgbench(proc.stdout)
    result = LoadResult(
        tool="pgbench", label=label, concurrency=concurrency, duration_s=duration, **parsed
    )
    result.raw = proc.stdout
    if delta:
        _charge(result, delta)
    return result


def _charge(result: LoadResult, delta: CpuDelta) -> None:
    result.cpu = {name: round(ms, 1) for name, ms in delta.ms.items()}
    result.machine_busy_pct = round(delta.machine_busy_pct, 1)
    result.other_load_pct = round(delta.other_pct, 1)
    result.loadgen_cpu_ms = round(delta.loadgen_ms, 1)
