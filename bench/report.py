"""Medians over the interleaved rounds, the markdown tables, and the targets of issue 6."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any

from bench.measure import LoadResult

ON, OFF, PG = "service_on", "service_off", "pgbench"
SERVER_GROUP = {ON: "server_on", OFF: "server_off"}

# Issue 6: targets on this 2-core machine.
CREATE_RATIO_MIN = 0.25
LIST_RATIO_MIN = 0.50
TRACING_COST_MAX = 0.15
P99_C8_MAX_MS = 15.0
RSS_MAX_MB = 150.0


@dataclass(slots=True)
class Run:
    op: str
    concurrency: int
    round: int
    kind: str  # ON, OFF or PG
    result: LoadResult


def _med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _per_round_ratio(runs: list[Run], num: str, den: str) -> float | None:
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.kind] = run.result.rate
    ratios = [r[num] / r[den] for r in by_round.values() if r.get(num) and r.get(den)]
    return median(ratios) if ratios else None


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (op, concurrency): medians over rounds; ratios taken within each round."""
    keys: list[tuple[str, int]] = []
    for run in runs:
        if (run.op, run.concurrency) not in keys:
            keys.append((run.op, run.concurrency))
    rows = []
    for op, conc in keys:
        group = [r for r in runs if r.op == op and r.concurrency == conc]
        row: dict[str, Any] = {"op": op, "concurrency": conc, "rounds": 0}
        for kind in (ON, OFF, PG):
            results = [r.result for r in group if r.kind == kind]
            if not results:
                continue
            row["rounds"] = max(row["rounds"], len(results))
            app = SERVER_GROUP.get(kind)
            row[kind] = {
                "rate": _med([x.rate for x in results]),
                "p50_ms": _med([x.p50_ms for x in results]),
                "p99_ms": _med([x.p99_ms for x in results]),
                "avg_ms": _med([x.avg_ms for x in results]),
                "app_cpu_ms_per_req": _med([x.cpu_ms_per_req(app) for x in results])
                if app
                else None,
                "pg_cpu_ms_per_req": _med([x.cpu_ms_per_req("postgres") for x in results]),
                "machine_busy_pct": _med([x.machine_busy_pct for x in results]),
                "other_load_pct": _med([x.other_load_pct for x in results]),
                "errors": sum(x.errors for x in results),
                "requests": sum(x.requests for x in results),
                "runs": [x.as_json() for x in results],
            }
        row["ratio"] = _per_round_ratio(group, ON, PG)
        row["ratio_tracing_off"] = _per_round_ratio(group, OFF, PG)
        on_off = _per_round_ratio(group, ON, OFF)
        row["tracing_cost_throughput"] = 1 - on_off if on_off is not None else None
        on_cpu = row.get(ON, {}).get("app_cpu_ms_per_req")
        off_cpu = row.get(OFF, {}).get("app_cpu_ms_per_req")
        row["tracing_cost_cpu"] = on_cpu / off_cpu - 1 if on_cpu and off_cpu else None
        rows.append(row)
    return rows


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def main_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| op | c | req/s | p50 ms | p99 ms | CPU ms/req app + PG | pgbench TPS | ratio "
        "| req/s tracing off | p99 ms off | ratio tracing off | tracing cost: req/s, CPU "
        "| busy % (other) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        on, off, pg = row.get(ON, {}), row.get(OFF, {}), row.get(PG, {})
        errors = on.get("errors", 0) + off.get("errors", 0) + pg.get("errors", 0)
        op = row["op"] + (f" ({errors} errors!)" if errors else "")
        lines.append(
            f"| {op} | {row['concurrency']} | {_f(on.get('rate'), '{:.0f}')} "
            f"| {_f(on.get('p50_ms'), '{:.2f}')} | {_f(on.get('p99_ms'), '{:.2f}')} "
            f"| {_f(on.get('app_cpu_ms_per_req'), '{:.2f}')} + "
            f"{_f(on.get('pg_cpu_ms_per_req'), '{:.2f}')} "
            f"| {_f(pg.get('rate'), '{:.0f}')} | **{_f(row['ratio'], '{:.3f}')}** "
            f"| {_f(off.get('rate'), '{:.0f}')} | {_f(off.get('p99_ms'), '{:.2f}')} "
            f"| {_f(row['ratio_tracing_off'], '{:.3f}')} "
            f"| {_pct(row['tracing_cost_throughput'])}, {_pct(row['tracing_cost_cpu'])} "
            f"| {_f(on.get('machine_busy_pct'), '{:.0f}')} "
            f"({_f(on.get('other_load_pct'), '{:.0f}')}) |"
        )
    return "\n".join(lines)


def scale_table(scale: list[dict[str, Any]]) -> str:
    lines = [
        "| case | rows of the user | p50 ms | p99 ms | req/s (c=1) | pgbench avg ms (c=1) | note |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for case in scale:
        res = case.get("result") or {}
        pg = case.get("pgbench") or {}
        lines.append(
            f"| {case['case']} | {case['rows']:,} | {_f(res.get('p50_ms'), '{:.2f}')} "
            f"| {_f(res.get('p99_ms'), '{:.2f}')} | {_f(res.get('rate'), '{:.0f}')} "
            f"| {_f(pg.get('avg_ms'), '{:.2f}')} | {case.get('note', '')} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], rss_mb: float | None) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: bool | None, shown: str) -> None:
        checks.append({"target": name, "value": value, "met": ok, "shown": shown})

    for row in rows:
        op, conc = row["op"], row["concurrency"]
        ratio = row["ratio"]
        if op == "create":
            add(
                f"create c={conc}: service/pgbench >= {CREATE_RATIO_MIN}",
                ratio,
                None if ratio is None else ratio >= CREATE_RATIO_MIN,
                _f(ratio, "{:.3f}"),
            )
        if op == "list":
            add(
                f"list c={conc}: service/pgbench >= {LIST_RATIO_MIN}",
                ratio,
                None if ratio is None else ratio >= LIST_RATIO_MIN,
                _f(ratio, "{:.3f}"),
            )
        cost = row["tracing_cost_throughput"]
        add(
            f"{op} c={conc}: tracing costs <= {TRACING_COST_MAX:.0%} of throughput",
            cost,
            None if cost is None else cost <= TRACING_COST_MAX,
            f"{_pct(cost)} (CPU/req {_pct(row['tracing_cost_cpu'])})",
        )
        if conc == 8:
            p99 = row.get(ON, {}).get("p99_ms")
            add(
                f"{op} c=8: p99 <= {P99_C8_MAX_MS:g} ms",
                p99,
                None if p99 is None else p99 <= P99_C8_MAX_MS,
                f"{_f(p99, '{:.2f}')} ms",
            )
    add(
        f"worker RSS after the run <= {RSS_MAX_MB:g} MB",
        rss_mb,
        None if rss_mb is None else rss_mb <= RSS_MAX_MB,
        f"{_f(rss_mb)} MB",
    )
    return checks


def targets_table(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | met |", "|---|--:|:-:|"]
    for check in checks:
        met = {True: "yes", False: "**NO**", None: "n/a"}[check["met"]]
        lines.append(f"| {check['target']} | {check['shown']} | {met} |")
    return "\n".join(lines)
