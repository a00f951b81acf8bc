"""The benchmark's own logic (bench/): the order of interleaved runs, ratios taken within a
round, issue 10's target table, and the list cases as queries the API accepts."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi.testclient import TestClient

from bench import explain, report
from bench.measure import LoadResult
from bench.report import OFF, ON, PG, REF, Run
from service.priority import Priority
from service.tasks.queries import SortField, SortOrder, StatusFilter, TaskFilter
from tests.support import ApiUser


def result(rate: float, p99_ms: float | None = None) -> LoadResult:
    return LoadResult(
        tool="test", label="t", concurrency=8, duration_s=1, requests=int(rate), rate=rate,
        p99_ms=p99_ms,
    )  # fmt: skip


def test_rounds_alternate_their_order_as_the_reference_readme_asks() -> None:
    """service, pgbench, pgbench, service, service, pgbench; with more kinds, a palindrome."""
    two = [kind for rnd in range(3) for kind in report.round_order([ON, REF], rnd)]
    assert two == [ON, REF, REF, ON, ON, REF]
    assert report.round_order([ON, REF, PG, OFF], 1) == [OFF, PG, REF, ON]
    assert report.round_order([ON, REF, PG, OFF], 2) == [ON, REF, PG, OFF]


def test_ratios_are_the_median_of_each_rounds_ratio() -> None:
    """Not median(service) / median(reference): a drifting machine moves both sides of a round."""
    service = [100.0, 300.0, 120.0]
    reference = [1000.0, 1000.0, 400.0]  # per round 0.1, 0.3, 0.3 -> median 0.3
    runs = [Run("create", 8, rnd, ON, result(rate)) for rnd, rate in enumerate(service)]
    runs += [Run("create", 8, rnd, REF, result(rate)) for rnd, rate in enumerate(reference)]
    [row] = report.summarize(runs)
    assert row["ratio_reference"] == 0.3  # the ratio of the medians would be 0.12
    assert row[ON]["rate"] == 120.0 and row[REF]["rate"] == 1000.0
    assert row["ratio"] is None  # no pgbench run with the service's SQL


def issue_runs(*, one_user: float | None, list_off: float) -> list[Run]:
    runs = []
    for rnd in range(3):
        runs += [
            Run("create", 8, rnd, ON, result(400.0, p99_ms=24.0)),
            Run("create", 8, rnd, OFF, result(440.0)),  # tracing costs 9%
            Run("create", 8, rnd, REF, result(3000.0)),  # ratio 0.133
            Run("list", 8, rnd, ON, result(600.0)),
            Run("list", 8, rnd, OFF, result(list_off)),
            Run("list", 8, rnd, PG, result(3000.0)),  # ratio 0.2
        ]
        if one_user is not None:
            runs.append(Run("create-1user", 8, rnd, ON, result(one_user)))
    return runs


def test_the_target_table_marks_each_figure_met_or_not() -> None:
    runs = issue_runs(one_user=360.0, list_off=750.0)  # one user 0.9; list tracing cost 20%
    checks = {c["key"]: c for c in report.issue_targets(runs, report.summarize(runs), 140.0)}
    assert checks["create_ratio"]["value"] == 400 / 3000
    assert checks["create_ratio"]["met"] is True
    assert "stretch" not in checks["create_ratio"]["shown"]
    assert checks["one_user"]["value"] == 0.9 and checks["one_user"]["met"] is True
    assert checks["create_p99"]["met"] is True
    assert checks["list_ratio"]["value"] == 0.2 and checks["list_ratio"]["met"] is False
    assert checks["tracing"]["value"] == 1 - 600 / 750  # the worse of create and list
    assert checks["tracing"]["met"] is False
    assert checks["rss"]["met"] is True
    table = report.targets_table(list(checks.values()))
    assert "| 0.048 | >= 0.12 (stretch 0.25) | 0.133 | met |" in table
    assert "| 0.11 | >= 0.25 | 0.200 | **not met** |" in table


def test_a_figure_without_its_runs_is_not_measured_rather_than_met() -> None:
    runs = issue_runs(one_user=None, list_off=600.0)
    checks = {c["key"]: c for c in report.issue_targets(runs, report.summarize(runs), None)}
    assert checks["one_user"]["met"] is None and checks["one_user"]["value"] is None
    assert checks["rss"]["met"] is None
    assert checks["tracing"]["met"] is True  # list 0%, create 9%
    assert "not measured" in report.targets_table(list(checks.values()))


def test_every_list_case_of_the_benchmark_is_a_query_the_api_accepts(
    client: TestClient, user: ApiUser
) -> None:
    """bench/run.py times each EXPLAINed case over HTTP with `Case.query_string()`."""
    cases = explain.cases("tag1", "Tag2")
    assert len({case.query_string() for case in cases}) == len(cases)
    for case in cases:
        response = client.get(user.url(f"?{case.query_string()}"), headers=user.headers)
        assert response.status_code == 200, (case.label, response.text)
    combined = explain.Case(
        "all",
        TaskFilter(
            status=StatusFilter.pending,
            priorities=(Priority.low, Priority.high),
            tags=("a b", "c"),
            due_before=explain.NOW,
            overdue=True,
            q="50% off",
        ),
        SortField.due_at,
        SortOrder.asc,
    )
    assert parse_qsl(combined.query_string(20)) == [
        ("status", "pending"),
        ("priority", "low"),
        ("priority", "high"),
        ("tag", "a b"),
        ("tag", "c"),
        ("due_before", explain.NOW.isoformat()),
        ("overdue", "true"),
        ("q", "50% off"),
        ("sort", "due_at"),
        ("order", "asc"),
        ("limit", "20"),
    ]
