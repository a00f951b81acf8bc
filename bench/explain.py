"""EXPLAIN of every filter and sort of the task list, for a user with many tasks.

The statements are the service's own (`service.tasks._list_statements`), compiled with the
query's values, and planned by PostgreSQL on the benchmark's database (seeded, VACUUM
ANALYZEd). For each case: the indexes the plan uses, whether it reads `tasks` sequentially,
and the execution time of the page and of its count (EXPLAIN ANALYZE).

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

import sqlalchemy as sa

from service.tasks.models import Priority
from service.tasks.queries import (
    SortField,
    SortOrder,
    StatusFilter,
    TaskFilter,
    _list_statements,
    _tag_ids,
)

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Case:
    label: str
    filters: TaskFilter
    sort: SortField = SortField.created_at
    order: SortOrder = SortOrder.desc


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
                page, count = _list_statements(case.filters.shape(), case.sort, case.order)
                params: dict[str, Any] = {"owner": user, "limit": limit, "offset": 0}
                params.update(case.filters.params())
                if case.filters.tags:
                    ids = _tag_ids(conn, user, case.filters.tags)
                    params.update({f"tag_{n}": i for n, i in enumerate(ids or [])})
                page_idx, page_seq, page_ms = explain(conn, page, params)
                if case.filters.narrows:
                    count_idx, count_seq, count_ms = explain(conn, count, params)
                else:  # X-Total-Count of an unfiltered list is users.task_count
                    count_idx, count_seq, count_ms = ["(users.task_count)"], False, 0.0
                results.append(
                    {
                        "case": case.label,
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


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| list query | page: indexes | page ms | count: indexes | count ms | seq scan on tasks |",
        "|---|---|--:|---|--:|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['case']}` | {', '.join(r['page_indexes']) or '-'} | {r['page_ms']} | "
            f"{', '.join(r['count_indexes']) or '-'} | {r['count_ms']} | "
            f"{'**yes**' if r['seq_scan_on_tasks'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    results = run(args.url, args.user)
    print(table(results))
    return 1 if any(r["seq_scan_on_tasks"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
