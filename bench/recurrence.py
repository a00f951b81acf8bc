"""What finding a recurring task's next date costs, for the rules that are slowest to answer:
those none of whose months has the day they name, which dateutil alone answers only after
visiting every month up to year 9999 (`service.tasks.recurrence._no_month_has_the_day`).

For each rule: microseconds per `next_occurrence` (what a create, an update and a completion
pay) and per dateutil's own search, best of a few rounds. No assertion: the figures move with
the machine, the comparison within one run is what they are for.

    .venv/bin/python bench/recurrence.py [--rounds 5] [--n 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dateutil.rrule import rrulestr  # noqa: E402

from service.tasks import recurrence  # noqa: E402

CASES = [
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31"),
    ("0001-02-01T00:00:00Z", "FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31"),
    ("2026-02-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=48;BYMONTHDAY=29"),
    ("2027-04-01T09:00:00Z", "FREQ=MONTHLY;INTERVAL=24;BYMONTHDAY=31;UNTIL=20991231T000000Z"),
    ("2027-02-01T09:00:00Z", "FREQ=MONTHLY;BYMONTHDAY=31"),
    ("2027-01-10T09:00:00Z", "FREQ=WEEKLY;BYDAY=MO,WE"),
]


def _best_us(
    call: Callable[[str, datetime], object], rule: str, due_at: datetime, rounds: int, n: int
) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call(rule, due_at)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def _dateutil_alone(rule: str, due_at: datetime) -> object:
    try:
        return rrulestr(rule, dtstart=due_at).after(due_at, inc=False)
    except (ValueError, OverflowError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    print("| due_at | rule | next_occurrence µs | dateutil alone µs |")
    print("|---|---|--:|--:|")
    for due, rule in CASES:
        due_at = datetime.fromisoformat(due)
        ours = _best_us(recurrence.next_occurrence, rule, due_at, args.rounds, args.n)
        alone = _best_us(_dateutil_alone, rule, due_at, args.rounds, args.n)
        print(f"| {due} | `{rule}` | {ours:,.0f} | {alone:,.0f} |")


if __name__ == "__main__":
    main()
