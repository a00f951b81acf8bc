"""EXPLAIN of every filter and sort of the task list, for a user with many tasks.

The statements are the service's own (`service.tasks.queries.list_query`), compiled with the
query's values, and planned by PostgreSQL on the benchmark's database (seeded, VACUUM
ANALYZEd). For each case: the indexes the plan uses, whether an index serves the page and the
count (no sequential scan of `tasks`), and the execution time of each (EXPLAIN ANALYZE).
`bench/run.py` also times each case over HTTP (`Case.query_string()`: the same filters as a
`GET /api/{user}/tasks` query).

    .venv/bin/python -m bench.explain --url postgresql://postgres@127.0.0.1:5432/todo_bench \\
        --user bench-s100000
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa

from service.priority import Priority
from service.tasks.queries import SortField, SortOrder, StatusFilter, TaskFilter, list_query

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Case:
    label: str
    filters: TaskFilter
    sort: SortField = SortField.created_at
    order: SortOrder = SortOrder.desc

    def query_string(self, limit: int = 50) -> str:
        """The same case as the query of `GET /api/{user}/tasks`."""
        f = self.filters
        pairs: list[tuple[str, str]] = []
        if f.status is not StatusFilter.all:
            pairs.append(("status", f.status.value))
        pairs += [("priority", p.value) for p in f.priorities]
        pairs += [("tag", tag) for tag in f.tags]
        if f.due_before is not None:
            pairs.append(("due_before", f.due_before.isoformat()))
        if f.due_after is not None:
            pairs.append(("due_after", f.due_after.isoformat()))
        if f.overdue:
            pairs.append(("overdue", "true"))
        if f.q:
            pairs.append(("q", f.q))
        pairs += [("sort", self.sort.value), ("order", self.order.value), ("limit", str(limit))]
        return urlencode(pairs)


def cases(tag: str, other_tag: str) -> list[Case]:
    every_sort = [
        Case(f"sort={sort.value}&order={order.value}", TaskFilter(), sort, order)
        for sort in SortField
        for order in SortOrder
    ]
    return [
        *every_sort,
        Case("status=pending", TaskFilter(status=StatusFilter.pending)),
        Case("status=completed", TaskFilter(status=StatusFilter.completed)),
        Case("priority=high", TaskFilter(priorities=(Priority.high,))),
        Case(
            "priority=low&priority=medium", TaskFilter(priorities=(Priority.low, Priority.medium))
        ),
        Case(f"tag={tag}", TaskFilter(tags=(tag,))),
        Case(f"tag={tag}&tag={other_tag}", TaskFilter(tags=(tag, other_tag))),
        Case("due_before=now-10d", TaskFilter(due_before=NOW - timedelta(days=10))),
        Case("due_after=now+30d", TaskFilter(due_after=NOW + timedelta(days=30))),
        Case("overdue=true", TaskFilter(overdue=True)),
        Case("q=task 4242", TaskFilter(q="task 4242")),
        Case(
            "status=pending&priority=high&sort=due_at&order=asc",
            TaskFilter(status=StatusFilter.pending, priorities=(Priority.high,)),
            SortField.due_at,
            SortOrder.asc,
        ),
        Case(
            f"tag={tag}&overdue=true&sort=priority",
            TaskFilter(tags=(tag,), overdue=True),
            SortField.priority,
        ),
    ]


def explain(
    conn: sa.Connection, statement: Any, params: dict[str, Any]
) -> tuple[list[str], bool, float]:
    """EXPLAIN ANALYZE of the statement with these values, as the service would send it."""
    compiled = statement.params(**params).compile(
        dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
    )
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string, compiled.params)
        plan = cursor.fetchone()[0]
    finally:
        cursor.close()
    text = json.dumps(plan)
    indexes = sorted(set(re.findall(r'"Index Name": "([^"]+)"', text)))
    seq_scan_on_tasks = bool(
        re.search(r'"Node Type": "Seq Scan", [^{}]*"Relation Name": "tasks"', text)
    )
    return indexes, seq_scan_on_tasks, float(plan[0]["Execution Time"])


def run(url: str, user: str, limit: int = 50) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    results = []
    try:
        with engine.connect() as conn:
            names = (
                conn.execute(
                    sa.text(
                        "SELECT t.name FROM tags t JOIN task_tags tt ON tt.tag_id = t.id "
                        "WHERE t.user_id = :u GROUP BY t.name ORDER BY count(*) DESC LIMIT 2"
                    ),
                    {"u": user},
                )
                .scalars()
                .all()
            )
            tag, other = [*names, "tag0", "tag3"][:2]
            for case in cases(tag, other):
                query = list_query(
                    conn, user, case.filters, case.sort, case.order, limit=limit, offset=0
                )
                if query is None:
                    raise SystemExit(f"{case.label}: {user} has no such tag")
                page, count, params = query
                page_idx, page_seq, page_ms = explain(conn, page, params)
                if case.filters.narrows:
                    count_idx, count_seq, count_ms = explain(conn, count, params)
                else:  # X-Total-Count of an unfiltered list is users.task_count
                    count_idx, count_seq, count_ms = ["(users.task_count)"], False, 0.0
                results.append(
                    {
                        "case": case.label,
                        "query": case.query_string(limit),
                        "page_indexed": bool(page_idx) and not page_seq,
                        "count_indexed": bool(count_idx) and not count_seq,
                        "page_indexes": page_idx,
                        "count_indexes": count_idx,
                        "seq_scan_on_tasks": page_seq or count_seq,
                        "page_ms": round(page_ms, 2),
                        "count_ms": round(count_ms, 2),
                    }
                )
    finally:
        engine.dispose()
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """One row per case; the HTTP columns when bench/run.py timed the case (wrk, c=1)."""
    lines = [
        "| list query | HTTP p50 ms | HTTP p99 ms | page: indexes | page ms | count: indexes "
        "| count ms | page from an index | count from an index |",
        "|---|--:|--:|---|--:|---|--:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['case']}` | {_ms(r.get('http_p50_ms'))} | {_ms(r.get('http_p99_ms'))} "
            f"| {', '.join(r['page_indexes']) or '-'} | {_ms(r['page_ms'])} "
            f"| {', '.join(r['count_indexes']) or '-'} | {_ms(r['count_ms'])} "
            f"| {_yes(r['page_indexed'])} | {_yes(r['count_indexed'])} |"
        )
    return "\n".join(lines)


def _yes(indexed: bool) -> str:
    return "yes" if indexed else "**no** (seq scan)"


def unindexed(results: list[dict[str, Any]]) -> list[str]:
    """The cases whose page or count reads `tasks` sequentially, with their times."""
    notes = []
    for r in results:
        parts = [
            f"{part} {r[part + '_ms']:.1f} ms"
            for part in ("page", "count")
            if not r[part + "_indexed"]
        ]
        if parts:
            notes.append(f"`{r['case']}`: sequential scan for the " + " and the ".join(parts))
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    results = run(args.url, args.user)
    print(table(results))
    return 1 if unindexed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
