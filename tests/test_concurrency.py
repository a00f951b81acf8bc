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
import pytest
import sqlalchemy as sa

from service.database import Database
from tests.reliability_helpers import TASK_ROW_LOCK, lock_waits, locked, wait_until
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


@pytest.mark.parametrize(
    ("method", "body"),
    [("PUT", {"title": "renamed"}), ("PUT", {"tags": ["a"]}), ("DELETE", None)],
    ids=["title", "tags-back", "delete"],
)
def test_a_writer_queued_behind_a_tag_change_reads_the_new_tags(
    live_server: LiveServer,
    user: ApiUser,
    database: Database,
    method: str,
    body: dict[str, Any] | None,
) -> None:
    """A write that waited for the task's lock reads the tags the writer before it committed.

    Its before-state came from one statement whose tags were read with the snapshot taken
    before the wait: the title change was a 500, tags set back were a 200 that changed
    nothing, and the delete recorded the old tags.
    """
    with live_server.client() as http:
        task = create_task(http, user, "queued", tags=["a"])
    url = user.url(f"/{task['id']}")
    with (
        locked(database.engine, TASK_ROW_LOCK, {"id": task["id"]}) as holder,
        ThreadPoolExecutor(max_workers=2) as pool,
        live_server.client() as a,
        live_server.client() as b,
    ):
        first = pool.submit(a.put, url, json={"tags": ["b"]}, headers=user.headers)
        wait_until(lambda: lock_waits(database.engine) == 1, "the first writer to queue")
        second = pool.submit(b.request, method, url, json=body, headers=user.headers)
        wait_until(lambda: lock_waits(database.engine) == 2, "the second writer to queue")
        holder.rollback()
        answers = first.result(timeout=30), second.result(timeout=30)
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["tags"] == ["b"]
    assert answers[1].status_code == (204 if method == "DELETE" else 200), answers[1].text
    with live_server.client() as http:
        events = http.get(
            f"/api/{user.user_id}/audit-events",
            params={"task_id": task["id"]},
            headers=user.headers,
        ).json()["items"]
        stored = http.get(url, headers=user.headers)
    last = events[0]  # newest first
    assert last["before"]["tags"] == ["b"]
    if method == "DELETE":
        assert stored.status_code == 404
        assert last["action"] == "task.deleted"
    else:
        expected = {**answers[0].json(), **body}  # type: ignore[dict-item]
        assert last["after"]["tags"] == expected["tags"]
        assert stored.json()["tags"] == expected["tags"]
        assert stored.json()["title"] == expected["title"]
        assert answers[1].json()["tags"] == expected["tags"]
    assert [e["action"] for e in events] == [
        "task.deleted" if method == "DELETE" else "task.updated",
        "task.updated",
        "task.created",
    ]
