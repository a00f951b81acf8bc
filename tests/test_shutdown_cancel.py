"""A request still running when `SHUTDOWN_TIMEOUT_SECONDS` runs out after SIGTERM.

uvicorn cancels it (CancelledError, not an Exception). The client must get what every other
"try again" gets, a 503 problem+json with Retry-After, X-Request-ID and CORS headers, not
uvicorn's bare text/plain 500; the write must not commit, even if the lock it waited for is
released afterwards; and the log must not report it as an unhandled exception.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from service.auth import create_dev_token
from service.problem_types import ProblemType
from service.settings import Settings
from tests.jwt_helpers import random_id
from tests.reliability_helpers import (
    TASK_ROW_LOCK,
    lock_waits,
    locked,
    tracked_app,
    wait_until,
)
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, ApiUser, LiveServer, assert_no_leak, assert_problem

ORIGIN = "https://app.example"


def test_write_cancelled_at_shutdown_timeout_is_503_problem_and_rolls_back(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "CORS_ORIGINS": ORIGIN,
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "SHUTDOWN_TIMEOUT_SECONDS": "1",
    }
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    admin = sa.create_engine(database_url)
    server = ServeProcess(tmp_path, env).start()
    holder = None
    try:
        created = httpx.post(
            f"{server.url}/api/{user_id}/tasks", json={"title": "before"}, headers=headers
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        holder = locked(admin, TASK_ROW_LOCK, {"id": task_id})
        request_headers = {**headers, "Origin": ORIGIN, "X-Request-ID": "cancelled-put-1"}
        with ThreadPoolExecutor(max_workers=1) as pool:
            put = pool.submit(
                httpx.put,
                f"{server.url}/api/{user_id}/tasks/{task_id}",
                json={"title": "after"},
                headers=request_headers,
                timeout=30,
            )
            wait_until(lambda: lock_waits(admin) >= 1, "the PUT to wait for the row lock")
            server.terminate()
            response = put.result(timeout=30)

        assert_problem(response, 503)
        assert int(response.headers["retry-after"]) > 0
        assert_no_leak(response)
        assert response.json()["type"] == ProblemType.unavailable.uri
        assert response.headers["x-request-id"] == "cancelled-put-1"
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in response.headers["access-control-expose-headers"].lower()

        # The lock goes away while the server may still be finishing: the abandoned write
        # must roll back, not commit behind the 503.
        holder.rollback()
        holder.close()
        holder = None
        assert server.wait(timeout=30) in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        server.stop()
    with admin.connect() as conn:
        title = conn.execute(
            sa.text("SELECT title FROM tasks WHERE id = :id"), {"id": task_id}
        ).scalar_one()
    admin.dispose()
    assert title == "before"

    log = server.log.read_text()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [line for line in lines if "unhandled" in line["message"]]
    warned = [line for line in lines if line.get("request_id") == "cancelled-put-1"]
    assert [line["level"] for line in warned if line["logger"] == "service.errors"] == [
        "WARNING"
    ], log[-4000:]


def _audit_event_count(conn: sa.Connection, user_id: str) -> int:
    query = "SELECT count(*) FROM audit_events WHERE user_id = :u"
    return int(conn.execute(sa.text(query), {"u": user_id}).scalar_one())


def test_cancelled_write_does_not_commit_when_its_lock_frees_after_the_503(
    settings: Settings, user: ApiUser
) -> None:
    """In a process that lives on after the cancellation (here: uvicorn in the test process),
    the worker thread still waiting for the row lock must roll back once it gets the lock,
    not commit the change the client was told was not made."""
    admin = sa.create_engine(settings.database_url or "")
    with (
        tracked_app(settings, cors_origins=[ORIGIN]) as tracked,
        LiveServer(tracked.app) as server,
        server.client() as http,
    ):
        server.server.config.timeout_graceful_shutdown = 1
        task = http.post(user.url(), json={"title": "before"}, headers=user.headers).json()
        with admin.connect() as conn:
            events_before = _audit_event_count(conn, user.user_id)
        holder = locked(admin, TASK_ROW_LOCK, task)
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                put = pool.submit(
                    http.put,
                    user.url(f"/{task['id']}"),
                    json={"title": "after"},
                    headers={**user.headers, "Origin": ORIGIN},
                )
                wait_until(lambda: tracked.waiting_pids(admin), "the PUT to wait for the lock")
                server.server.should_exit = True
                response = put.result(timeout=30)
            assert_problem(response, 503)
            assert response.json()["type"] == ProblemType.unavailable.uri
            assert int(response.headers["retry-after"]) > 0
            assert response.headers["access-control-allow-origin"] == ORIGIN
            assert response.headers["x-request-id"]
            assert tracked.database.engine.pool.checkedout() == 1  # the thread still waits
        finally:
            holder.rollback()
            holder.close()
        # The thread gets the lock, runs its UPDATE, and gives its connection back.
        wait_until(lambda: tracked.database.engine.pool.checkedout() == 0, "the thread to end")
    with admin.connect() as conn:
        title = conn.execute(
            sa.text("SELECT title FROM tasks WHERE id = :id"), {"id": task["id"]}
        ).scalar_one()
        events_after = _audit_event_count(conn, user.user_id)
    admin.dispose()
    assert title == "before"
    assert events_after == events_before


def test_a_read_cancelled_while_it_gives_its_connection_back_says_nothing_was_changed(
    settings: Settings, user: ApiUser
) -> None:
    """A read unit (`ReadSessionDep`) has nothing to commit: cancelled at the shutdown timeout
    while its worker thread is already finishing it (past `_Finish.may_commit`, giving its
    connection back), the 503 says nothing was changed, not that a change "may have been
    saved" (which tells the client to reload before retrying a GET)."""
    with (
        tracked_app(settings) as tracked,
        LiveServer(tracked.app) as server,
        server.client() as http,
    ):
        server.server.config.timeout_graceful_shutdown = 1
        assert http.post(user.url(), json={"title": "t"}, headers=user.headers).is_success
        finishing, release = threading.Event(), threading.Event()

        def hold_checkin(_dbapi_connection: Any, _record: Any) -> None:
            if not finishing.is_set():
                finishing.set()
                release.wait(timeout=30)

        with ThreadPoolExecutor(max_workers=1) as pool:
            sa.event.listen(tracked.database.engine, "checkin", hold_checkin)
            try:
                read = pool.submit(http.get, user.url(), headers=user.headers)
                assert finishing.wait(timeout=30), "the read never gave its connection back"
                server.server.should_exit = True
                response = read.result(timeout=30)
            finally:
                release.set()
        assert_problem(response, 503)
        assert response.json()["detail"] == (
            "The server stopped before the request finished; nothing was changed."
        )
