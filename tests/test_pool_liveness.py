"""A dead pooled connection is never used for a request, without a ping per request.

The pool used to send `SELECT 1` before lending each connection. Now a connection the server
closed is noticed at checkout without a round trip (its socket is readable), and a request
whose first statement fails because its connection died before anything was sent (the
implicit BEGIN failed) is run again on a fresh connection. A write's failure after a statement
may have run is never retried: that is a 503 (tests/test_faults.py). A read unit
(`ReadSessionDep`, autocommit) is run again once on any lost connection.
"""

from __future__ import annotations

import functools
import os
import resource
import select
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2.errors
import pytest
import sqlalchemy as sa

from audit.verify import verify_chain
from service.database import Database
from service.settings import Settings
from tests.feed_helpers import FeedReader
from tests.reliability_helpers import (
    TcpProxy,
    live,
    proxied_url,
    server_address,
    terminate,
    tracked_app,
    wait_until,
)
from tests.support import ApiUser, MakeUser

T = TypeVar("T")


def _titles(admin: sa.Engine, user: ApiUser) -> list[str]:
    with admin.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT title FROM tasks WHERE user_id = :u ORDER BY id"), {"u": user.user_id}
        )
        return list(rows.scalars())


def _events_of(admin: sa.Engine, request_id: str) -> int:
    with admin.connect() as conn:
        query = "SELECT count(*) FROM audit_events WHERE request_id = :r"
        return int(conn.execute(sa.text(query), {"r": request_id}).scalar_one())


def _chain_ok(admin: sa.Engine, user: ApiUser) -> bool:
    with admin.connect() as conn:
        return verify_chain(conn, user.user_id).ok


def test_requests_send_no_ping(settings: Settings, database: Database, user: ApiUser) -> None:
    """On the wire (a proxy reading the client's messages): each write is one transaction,
    BEGIN first, and no `SELECT 1` anywhere. A read of tasks sends its statements alone, in
    autocommit: no BEGIN, no COMMIT (a list page with its total is one statement), and the
    write after it on the same connection is a transaction again."""
    target = database.engine.url
    with TcpProxy(server_address(target)) as proxy:
        url = proxied_url(target, proxy.port)
        with (
            tracked_app(settings, url) as tracked,
            live(tracked.app) as server,
            server.client(headers=user.headers) as http,
        ):
            task = http.post(user.url(), json={"title": "warm"}).json()  # user provisioned
            proxy.take_queries()
            requests = [
                ("GET", user.url(), None),
                ("POST", user.url(), {"title": "second"}),
                ("PUT", user.url(f"/{task['id']}"), {"title": "renamed"}),
                ("GET", user.url(f"/{task['id']}"), None),
            ]
            for method, path, body in requests:
                assert http.request(method, path, json=body).is_success
                queries = proxy.take_queries()
                assert b"SELECT 1" not in queries, queries
                if method == "GET":
                    assert len(queries) == 1, queries
                    assert queries[0].startswith(b"SELECT"), queries
                    continue
                assert queries[0] == b"BEGIN", queries
                assert queries[-1] == b"COMMIT", queries
                assert queries.count(b"BEGIN") == 1, queries


def test_connections_terminated_between_requests_are_replaced(
    settings: Settings, make_user: MakeUser, database: Database
) -> None:
    """Every pooled connection terminated while idle: the next requests all succeed, on new
    connections, and each write is there once with its event."""
    admin = database.engine
    users = [make_user() for _ in range(2)]
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        for user in users:
            assert http.post(user.url(), json={"title": "warm"}, headers=user.headers).is_success
        engine = tracked.database.engine
        held = [engine.connect() for _ in range(4)]
        for conn in held:
            conn.close()
        for round_ in range(3):
            idle = tracked.live_pids(admin, state="idle")
            assert terminate(admin, idle) == len(idle) >= 1
            wait_until(lambda idle=idle: not set(tracked.live_pids(admin)) & set(idle), "exits")
            for n, user in enumerate(users * 3):
                request_id = uuid.uuid4().hex
                headers = {**user.headers, "X-Request-ID": request_id}
                created = http.post(user.url(), json={"title": f"r{round_}-{n}"}, headers=headers)
                assert created.status_code == 201, created.text
                assert _events_of(admin, request_id) == 1
                assert http.get(user.url(), headers=user.headers).status_code == 200
    for user in users:
        assert len(_titles(admin, user)) == 1 + 3 * 3
        assert _chain_ok(admin, user)


def test_a_connection_left_in_an_aborted_transaction_is_not_lent_again(
    settings: Settings, user: ApiUser
) -> None:
    """A cancel or statement timeout landing on psycopg2's own BEGIN leaves the server in an
    aborted transaction that psycopg2 does not know of (its rollback() sends nothing). Made
    here directly; the pool's one connection must not carry it into the next requests (it
    gave a 500 on every request it served, until recycled)."""
    with (
        tracked_app(settings, db_pool_size=1, db_max_overflow=0) as tracked,
        live(tracked.app) as server,
        server.client() as http,
    ):
        assert http.get(user.url(), headers=user.headers).status_code == 200
        with tracked.database.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.autocommit = True
            with raw.cursor() as cursor, pytest.raises(psycopg2.errors.DivisionByZero):
                cursor.execute("BEGIN; SELECT 1/0")
            raw.autocommit = False
            assert raw.info.transaction_status == 3  # TRANSACTION_STATUS_INERROR
        for _ in range(3):
            assert http.get(user.url(), headers=user.headers).status_code == 200
            created = http.post(user.url(), json={"title": "after"}, headers=user.headers)
            assert created.status_code == 201, created.text
            assert http.get("/readyz").status_code == 200


def test_readyz_is_503_when_no_pooled_connection_is_free(settings: Settings) -> None:
    with (
        tracked_app(
            settings, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=1
        ) as tracked,
        live(tracked.app) as server,
        server.client() as http,
        tracked.database.engine.connect() as held,
    ):
        held.execute(sa.text("SELECT 1"))
        resp = http.get("/readyz")
        assert resp.status_code == 503 and resp.headers["Retry-After"]


def test_connections_closed_by_idle_session_timeout_are_replaced(
    settings: Settings, user: ApiUser, database: Database
) -> None:
    """The server closes connections idle for 200 ms (what Neon and poolers do after a
    while): requests after a pause still succeed."""
    admin = database.engine
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:

        def short_idle_timeout(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.autocommit = True
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET idle_session_timeout = 200")
            dbapi_connection.autocommit = False

        sa.event.listen(tracked.database.engine, "connect", short_idle_timeout)
        for round_ in range(4):
            for n in range(3):
                created = http.post(
                    user.url(), json={"title": f"p{round_}-{n}"}, headers=user.headers
                )
                assert created.status_code == 201, created.text
                assert http.get(user.url(), headers=user.headers).status_code == 200
            time.sleep(0.5)  # every pooled connection times out
        assert len(tracked.pids) >= 4  # closed connections were replaced
    assert len(_titles(admin, user)) == 12
    assert _chain_ok(admin, user)


class _KillAfterCheckout:
    """Terminates the backend of the next connection the pool lends while `once` runs, and
    waits for its goodbye: the race of a connection dying right after checkout."""

    def __init__(self, admin: sa.Engine, engine: sa.Engine) -> None:
        self.admin = admin
        self.killed: list[int] = []
        self.armed = False
        sa.event.listen(engine, "checkout", self._die)

    def _die(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if self.armed and not self.killed:
            self.killed.append(int(dbapi_connection.get_backend_pid()))
            assert terminate(self.admin, self.killed) == 1
            select.select([dbapi_connection.fileno()], [], [], 5)  # the goodbye arrived

    def once(self, send: Callable[[], T]) -> T:
        """`send()` with exactly one connection killed after its checkout."""
        self.killed.clear()
        self.armed = True
        try:
            result = send()
        finally:
            self.armed = False
        assert len(self.killed) == 1
        return result


def test_connection_dying_between_checkout_and_begin_is_retried_once(
    settings: Settings, user: ApiUser, database: Database
) -> None:
    """The race the checkout test cannot see: the connection dies right after it was lent.
    Its BEGIN fails, nothing was sent, and the request runs again on a new connection: the
    client gets its 201 and the write is there once, with one event."""
    admin = database.engine
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        http.post(user.url(), json={"title": "warm"}, headers=user.headers)
        killer = _KillAfterCheckout(admin, tracked.database.engine)
        for method, path, body, expected in (
            ("POST", user.url(), {"title": "retried"}, 201),
            ("GET", user.url(), None, 200),
        ):
            request_id = uuid.uuid4().hex
            headers = {**user.headers, "X-Request-ID": request_id}
            send = functools.partial(http.request, method, path, json=body, headers=headers)
            resp = killer.once(send)
            assert resp.status_code == expected, resp.text
            if method == "POST":
                assert _events_of(admin, request_id) == 1
        assert killer.killed[0] not in tracked.live_pids(admin)
    assert _titles(admin, user) == ["warm", "retried"]
    assert _chain_ok(admin, user)


def test_work_outside_a_request_unit_is_retried_once_too(
    settings: Settings, make_user: MakeUser, user: ApiUser, database: Database
) -> None:
    """Three transactions of their own, outside the endpoint's retried unit of work: a new
    user's row, /readyz's ping and a stream ticket's redemption. Each one's connection dies
    right after checkout, and each is run again on a new connection (they were a 503)."""
    admin = database.engine
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        http.post(user.url(), json={"title": "warm"}, headers=user.headers)
        ticket = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()
        killer = _KillAfterCheckout(admin, tracked.database.engine)
        newcomer = make_user()
        first = killer.once(lambda: http.get(newcomer.url(), headers=newcomer.headers))
        assert first.status_code == 200
        assert _users(admin, newcomer) == 1
        assert killer.once(lambda: http.get("/readyz")).status_code == 200

        def open_stream() -> int:
            with FeedReader(server.url, ticket["stream_url"]) as reader:
                return reader.status or 0

        assert killer.once(open_stream) == 200


def _users(admin: sa.Engine, user: ApiUser) -> int:
    with admin.connect() as conn:
        query = "SELECT count(*) FROM users WHERE id = :u"
        return int(conn.execute(sa.text(query), {"u": user.user_id}).scalar_one())


def test_the_checkout_check_works_past_1024_descriptors(
    settings: Settings, user: ApiUser, database: Database
) -> None:
    """A worker with thousands of open change-feed streams has socket descriptors past
    select()'s limit: connections opened there are checked, and replaced when dead, too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    admin = database.engine
    try:
        with (
            tracked_app(settings) as tracked,
            live(tracked.app) as server,
            server.client(headers=user.headers) as http,
        ):
            assert http.post(user.url(), json={"title": "high"}).status_code == 201
            with tracked.database.engine.connect() as conn:
                assert conn.connection.dbapi_connection.fileno() > 1024  # type: ignore[union-attr]
            idle = tracked.live_pids(admin, state="idle")
            assert terminate(admin, idle) == len(idle) >= 1
            wait_until(lambda: not set(tracked.live_pids(admin)) & set(idle), "exits")
            assert http.post(user.url(), json={"title": "again"}).status_code == 201
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _titles(admin, user) == ["high", "again"]


def test_a_read_whose_answer_is_lost_is_run_once_more_and_only_once(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """A read unit's statement reached the server and its answer was lost with the connection:
    the read runs again on a new connection (200, the right total). Lost again, it is a 503,
    not a third try; the next write on the pool is a transaction (`BEGIN` first)."""
    target = database.engine.url
    with TcpProxy(server_address(target)) as proxy:
        url = proxied_url(target, proxy.port)
        with (
            tracked_app(settings, url, db_pool_size=1, db_max_overflow=0) as tracked,
            live(tracked.app) as server,
            server.client(headers=user.headers) as http,
        ):
            for n in range(3):
                assert http.post(user.url(), json={"title": f"t{n}"}).status_code == 201
            proxy.take_queries()
            proxy.drop_reply_after(b"task_count")
            resp = http.get(user.url(), params={"limit": 2})
            assert resp.status_code == 200 and resp.headers["X-Total-Count"] == "3"
            assert proxy.dropped == 1
            assert len(proxy.take_queries()) == 2  # the statement, and once more

            def lose_every_answer(*_: Any) -> None:
                proxy.drop_reply_after(b"task_count")

            engine = tracked.database.engine
            sa.event.listen(engine, "before_cursor_execute", lose_every_answer)
            try:
                assert http.get(user.url(), params={"limit": 2}).status_code == 503
            finally:
                sa.event.remove(engine, "before_cursor_execute", lose_every_answer)
            assert proxy.dropped == 3
            assert len(proxy.take_queries()) == 2
            assert http.post(user.url(), json={"title": "after"}).status_code == 201
            assert proxy.take_queries()[0] == b"BEGIN"
