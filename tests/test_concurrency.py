"""Real concurrency: the app under uvicorn on a socket, hit from several threads at once.

A barrier releases the requests together so they overlap in the server; the assertions are
about outcomes (no lost update, exactly N rows), never about timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa

from service.database import Database
from tests.support import ApiUser, LiveServer, assert_problem, create_task

T = TypeVar("T")


def run_together(count: int, work: Callable[[httpx.Client, int], T], server: LiveServer) -> list[T]:
    """Run `work` in `count` threads, each with its own connection, released at once."""
    barrier = threading.Barrier(count)

    def one(index: int) -> T:
        with server.client() as http:
            http.get("/healthz")  # connect before the barrier, so the requests overlap
            barrier.wait(timeout=30)
            return work(http, index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_toggles_never_lose_an_update(
    live_server: LiveServer, user: ApiUser, database: Database
) -> None:
    """Two toggles at once: one sees false->true, the other true->false; back to the start."""
    with live_server.client() as http:
        task = create_task(http, user, "toggle me")
    url = user.url(f"/{task['id']}/complete")
    for _ in range(5):
        results = run_together(
            2, lambda http, _: http.patch(url, headers=user.headers), live_server
        )
        assert [r.status_code for r in results] == [200, 200]
        assert sorted(r.json()["completed"] for r in results) == [False, True]
        assert len({r.headers["ETag"] for r in results}) == 2
        with live_server.client() as http:
            assert (
                http.get(user.url(f"/{task['id']}"), headers=user.headers).json()["completed"]
                is False
            )

    results = run_together(8, lambda http, _: http.patch(url, headers=user.headers), live_server)
    assert sorted(r.json()["completed"] for r in results) == [False] * 4 + [True] * 4
    with live_server.client() as http:
        final = http.get(user.url(f"/{task['id']}"), headers=user.headers).json()
    assert final["completed"] is False
    assert database.engine.pool.checkedout() == 0


def test_fifty_parallel_creates_make_exactly_fifty_tasks(
    live_server: LiveServer, user: ApiUser, database: Database
) -> None:
    def make(http: httpx.Client, index: int) -> dict[str, Any]:
        return create_task(http, user, f"parallel {index}")

    made = run_together(50, make, live_server)
    assert len({task["id"] for task in made}) == 50

    with live_server.client() as http:
        resp = http.get(user.url(), params={"limit": 500}, headers=user.headers)
        # A full page takes the total from the user's running count, kept by a trigger.
        first = http.get(user.url(), params={"limit": 1}, headers=user.headers)
    assert first.headers["X-Total-Count"] == "50"
    assert resp.headers["X-Total-Count"] == "50"
    listed = resp.json()
    assert sorted(t["id"] for t in listed) == sorted(t["id"] for t in made)
    assert {t["title"] for t in listed} == {f"parallel {i}" for i in range(50)}

    # One audit event each, with a gap-free chain sequence despite the contention.
    with database.engine.connect() as conn:
        seqs = conn.execute(
            sa.text("SELECT seq FROM audit_events WHERE user_id = :u ORDER BY seq"),
            {"u": user.user_id},
        ).scalars()
        assert list(seqs) == list(range(1, 51))
    assert database.engine.pool.checkedout() == 0


def test_two_writers_with_the_same_etag_exactly_one_wins(
    live_server: LiveServer, user: ApiUser
) -> None:
    with live_server.client() as http:
        task = create_task(http, user, "contended")
        url = user.url(f"/{task['id']}")
    for round_ in range(3):
        with live_server.client() as http:
            etag = http.get(url, headers=user.headers).headers["ETag"]

        def write(http: httpx.Client, index: int, etag: str = etag, round_: int = round_) -> Any:
            headers = {**user.headers, "If-Match": etag}
            return http.put(url, json={"title": f"writer {index} r{round_}"}, headers=headers)

        results = run_together(2, write, live_server)
        assert sorted(r.status_code for r in results) == [200, 412]
        winner = next(r for r in results if r.status_code == 200)
        assert_problem(next(r for r in results if r.status_code == 412), 412)
        with live_server.client() as http:
            current = http.get(url, headers=user.headers)
        assert current.json()["title"] == winner.json()["title"]
        assert current.headers["ETag"] == winner.headers["ETag"] != etag
