"""Thread hand-offs per request: a sync endpoint's body and its commit share one worker thread.

Each hop to a worker thread costs a context switch and a wait for a thread-pool token; the
commit used to take a second one. The hops are counted on the real app over ASGI, by wrapping
the two ways code reaches a thread (anyio's `to_thread.run_sync`, behind Starlette's
`run_in_threadpool`, and asyncio's `run_in_executor`, behind `asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio.to_thread
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import Database
from service.deps import UnitOfWorkRoute, get_read_session, get_session
from service.routing import every_route
from service.settings import Settings
from tests.reliability_helpers import lock_waits, wait_until
from tests.support import ApiUser, LiveServer


class HopCounter:
    def __init__(self) -> None:
        self.hops: list[str] = []
        self._lock = threading.Lock()

    def note(self, function: Callable[..., Any]) -> None:
        with self._lock:
            self.hops.append(getattr(function, "__name__", repr(function)))

    def take(self) -> list[str]:
        with self._lock:
            hops, self.hops = self.hops, []
        return hops


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> HopCounter:
    counter = HopCounter()
    run_sync = anyio.to_thread.run_sync
    run_in_executor = asyncio.BaseEventLoop.run_in_executor

    async def counted_run_sync(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        counter.note(function)
        return await run_sync(function, *args, **kwargs)

    def counted_run_in_executor(
        loop: asyncio.BaseEventLoop, executor: Any, function: Callable[..., Any], *args: Any
    ) -> Any:
        counter.note(function)
        return run_in_executor(loop, executor, function, *args)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted_run_sync)
    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", counted_run_in_executor)
    return counter


@pytest.fixture
def quiet_client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """Rate limiting off, as in the benchmark: the in-memory limiter's expiry sweep runs in
    threads of its own, at times unrelated to the request."""
    app = create_app(settings.model_copy(update={"rate_limit_enabled": False}), database)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_each_request_of_a_known_user_takes_one_thread_hop(
    quiet_client: TestClient, user: ApiUser, hops: HopCounter
) -> None:
    """Writes, reads (a 304 and a HEAD too), a 404 and a 412: one hop each (the endpoint with
    its commit or rollback), once the token is verified and the user's row provisioned."""
    http, url = quiet_client, user.url()
    first = http.post(url, json={"title": "first"}, headers=user.headers)
    assert first.status_code == 201
    task_url = user.url(f"/{first.json()['id']}")
    hops.take()  # the first request also verified the token and provisioned the user

    calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str], int]] = [
        ("POST", url, {"title": "second", "tags": ["a"]}, {}, 201),
        ("GET", url, None, {}, 200),
        ("GET", task_url, None, {}, 200),
        ("GET", task_url, None, {"If-None-Match": "*"}, 304),
        ("HEAD", task_url, None, {}, 200),
        ("PUT", task_url, {"title": "renamed"}, {}, 200),
        ("PUT", task_url, {"title": "stale"}, {"If-Match": '"1-1"'}, 412),
        ("PATCH", task_url + "/complete", None, {}, 200),
        ("GET", user.url("/999999999"), None, {}, 404),
        ("GET", f"/api/{user.user_id}/tags", None, {}, 200),
        ("GET", f"/api/{user.user_id}/audit-events", None, {}, 200),
        ("DELETE", task_url, None, {}, 204),
    ]
    for method, path, body, headers, expected in calls:
        resp = http.request(method, path, json=body, headers={**user.headers, **headers})
        assert resp.status_code == expected, (method, path, resp.text)
        assert len(hops.take()) == 1, (method, path)


def test_the_commit_runs_in_the_endpoints_thread(
    quiet_client: TestClient, user: ApiUser, hops: HopCounter
) -> None:
    """The write is committed before the response is sent: the row is visible to another
    connection as soon as the 201 arrives, with no second hop."""
    http = quiet_client
    http.get(user.url(), headers=user.headers)
    hops.take()
    created = http.post(user.url(), json={"title": "committed"}, headers=user.headers)
    assert created.status_code == 201
    assert len(hops.take()) == 1
    app: FastAPI = http.app  # type: ignore[assignment]
    with app.state.db.engine.connect() as conn:
        title = conn.execute(
            sa.text("SELECT title FROM tasks WHERE id = :id"), {"id": created.json()["id"]}
        ).scalar_one()
    assert title == "committed"


def _takes(dependant: Any, dependency: Callable[..., Any]) -> bool:
    """Whether `dependency` is among the dependant's, at any depth."""
    return any(d.call is dependency or _takes(d, dependency) for d in dependant.dependencies)


def _uses_session(dependant: Any) -> bool:
    return _takes(dependant, get_session) or _takes(dependant, get_read_session)


def test_every_route_with_a_session_finishes_it_in_the_endpoints_thread(app: FastAPI) -> None:
    """A router that forgets `route_class=UnitOfWorkRoute` pays a second hop per request."""
    with_session = [
        route
        for route in every_route(app.routes)
        if isinstance(route, APIRoute) and _uses_session(route.dependant)
    ]
    assert len(with_session) >= 15
    assert [r.path for r in with_session if not isinstance(r, UnitOfWorkRoute)] == []


def test_only_reads_take_a_read_unit(app: FastAPI) -> None:
    """A read unit runs each statement in autocommit, so a write there would commit alone:
    only GET routes (and their HEAD) take one, and the reads of one statement do."""
    readers = {
        (route.path, method)
        for route in every_route(app.routes)
        if isinstance(route, APIRoute) and _takes(route.dependant, get_read_session)
        for method in route.methods
    }
    assert {method for _, method in readers} <= {"GET", "HEAD"}, readers
    tasks, tags = "/api/{user_id}/tasks", "/api/{user_id}/tags"
    expected = {tasks, tasks + "/{task_id}", tags, tags + "/{tag_id}", "/api/{user_id}/reminders"}
    expected |= {"/api/{user_id}/audit-events", tasks + "/{task_id}/history"}
    assert {(path, "GET") for path in expected} <= readers


def test_writes_queued_behind_one_users_lock_on_a_small_thread_pool_all_commit(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """Three thread-pool tokens, twelve writes to one user waiting on its chain-head lock: the
    writer holding the lock commits in its own thread instead of waiting for a token the
    queued writers hold, so all of them finish (no deadlock, no timeout)."""
    app = create_app(settings.model_copy(update={"rate_limit_enabled": False}), database)

    async def small_pool(scope: Any, receive: Any, send: Any) -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 3
        await app(scope, receive, send)

    with LiveServer(small_pool) as server, server.client(headers=user.headers) as http:  # type: ignore[arg-type]
        assert http.post(user.url(), json={"title": "seed"}).status_code == 201
        holder = database.engine.connect()
        holder.execute(
            sa.text("SELECT 1 FROM audit_chain_heads WHERE user_id = :u FOR UPDATE"),
            {"u": user.user_id},
        )
        try:
            with ThreadPoolExecutor(12) as pool:
                futures = [
                    pool.submit(http.post, user.url(), json={"title": f"queued {n}"})
                    for n in range(12)
                ]
                # Well within the statement timeout (10 s), which would fail the waiters.
                wait_until(
                    lambda: lock_waits(database.engine) >= 3,
                    "three writers queued on the chain-head lock",
                    timeout=5,
                )
                holder.rollback()
                statuses = [future.result(timeout=60).status_code for future in futures]
        finally:
            holder.close()
        assert statuses == [201] * 12
        titles = [t["title"] for t in http.get(user.url(), params={"limit": 50}).json()]
        assert len(titles) == 13
