"""What the request plumbing of issue 10 saved, each part measured alone (no server, no load):

- a pool checkout with `pool_pre_ping` (a `SELECT 1` round trip) against one with the checkout
  check that replaced it (`service.database`: a zero-timeout `poll()` of the socket);
- one thread hop (`anyio.to_thread.run_sync` of a function that does nothing), the hand-off a
  write no longer makes for its commit.

Wall and CPU microseconds per operation, medians of interleaved rounds. No assertion: the
figures move with the machine's load, the comparison within one run is what they are for.

    .venv/bin/python bench/plumbing_cost.py [--pg-url URL] [--rounds 7] [--n 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from service.database import build_engine  # noqa: E402
from service.settings import Settings  # noqa: E402


def checkout_costs(url: str, rounds: int, n: int) -> dict[str, tuple[float, float]]:
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    now = build_engine(settings)  # the checkout check, no ping
    ping = build_engine(settings)
    ping.pool._pre_ping = True  # what build_engine used to ask for
    costs: dict[str, list[tuple[float, float]]] = {"pre-ping": [], "socket check": []}
    engines = {"pre-ping": ping, "socket check": now}
    for engine in engines.values():
        engine.connect().close()
    for _ in range(rounds):
        for name, engine in engines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                engine.connect().close()
            costs[name].append(
                ((time.perf_counter() - wall) * 1e6 / n, (time.process_time() - cpu) * 1e6 / n)
            )
    for engine in engines.values():
        engine.dispose()
    return {name: _medians(values) for name, values in costs.items()}


def hop_cost(rounds: int, n: int) -> tuple[float, float]:
    async def hops() -> list[tuple[float, float]]:
        results = []
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await anyio.to_thread.run_sync(_nothing)
            results.append(
                ((time.perf_counter() - wall) * 1e6 / n, (time.process_time() - cpu) * 1e6 / n)
            )
        return results

    return _medians(anyio.run(hops))


def _nothing() -> None:
    return None


def _medians(values: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    sa.make_url(args.pg_url)  # a bad URL fails here, before anything runs
    print("| operation | wall us | CPU us |")
    print("|---|--:|--:|")
    for name, (wall, cpu) in checkout_costs(args.pg_url, args.rounds, args.n).items():
        print(f"| pool checkout + checkin, {name} | {wall:.0f} | {cpu:.0f} |")
    wall, cpu = hop_cost(args.rounds, args.n)
    print(f"| one thread hop (anyio.to_thread.run_sync) | {wall:.0f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
