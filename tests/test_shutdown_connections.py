"""Connections at SIGTERM: what a client whose request met the shutdown can rely on.

A request the server has begun to read is answered; a connection it has not read from is
closed or refused, so a client that got no byte of an answer knows that nothing was done (the
race that HTTP/1.1 keep-alive cannot close: a request sent as the server closes an idle
connection). Under load, two faults broke that: uvicorn closed an idle connection whose next
request had begun to arrive, and with `--workers N` its supervisor kept the listening socket
open until it exited, so new connections were completed by the kernel, never accepted, and
reset at the end.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request

from service.auth import create_dev_token
from service.httpserver import LINGER_SECONDS, BoundedHttpToolsProtocol
from tests.jwt_helpers import random_id
from tests.reliability_helpers import TASK_ROW_LOCK, lock_waits, locked, wait_until
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, ApiUser, LiveServer, assert_server_problem, create_task

PATIENCE = 30


def _env(database_url: str) -> dict[str, str]:
    return {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "SHUTDOWN_TIMEOUT_SECONDS": "60",
        # A write waiting for a row lock waits until the test frees it.
        "DB_STATEMENT_TIMEOUT_MS": "120000",
        # Longer than any of these tests waits: no head is closed for its time here.
        "REQUEST_HEAD_TIMEOUT_SECONDS": "120",
    }


def _refuses_connections(server: ServeProcess) -> bool:
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE).close()
    except ConnectionRefusedError:
        return True
    return False


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response; a connection closed before all of it fails the test."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


@dataclass
class _HeldPut:
    """A PUT of a task, in flight: it waits for the task's row lock, which `holder` holds."""

    put: Future[httpx.Response]
    holder: sa.Connection

    def answer(self) -> httpx.Response:
        """Frees the lock; the PUT's answer."""
        self.holder.rollback()
        return self.put.result(timeout=PATIENCE * 3)


@contextmanager
def _put_in_flight(admin: sa.Engine, server: ServeProcess, user: ApiUser) -> Iterator[_HeldPut]:
    """A request being worked on (across a SIGTERM, say) until `answer()` lets it finish."""
    with httpx.Client(base_url=server.url) as http:
        task_id = create_task(http, user, "before")["id"]
    holder = locked(admin, TASK_ROW_LOCK, {"id": task_id})
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            put = pool.submit(
                httpx.put,
                f"{server.url}{user.url(f'/{task_id}')}",
                json={"title": "after"},
                headers=user.headers,
                timeout=PATIENCE * 3,
            )
            wait_until(lambda: lock_waits(admin) >= 1, "the PUT to wait for the row lock")
            yield _HeldPut(put, holder)
        finally:  # before the pool waits for the PUT
            holder.rollback()
            holder.close()


def test_a_request_begun_on_an_idle_connection_at_shutdown_is_answered(
    database_url: str, tmp_path: Path
) -> None:
    user_id = random_id()
    token = create_dev_token(TEST_SECRET, user_id)
    body = json.dumps({"title": "sent across the shutdown"}).encode()
    head = (
        f"POST /api/{user_id}/tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "X-Request-ID: across-shutdown-1\r\n"
    ).encode()
    server = ServeProcess(tmp_path, _env(database_url)).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert _read_response(sock)[0] == 200  # kept alive, and idle
            sock.sendall(head)  # the next request begins to arrive
            server.terminate()
            # Refused: the server has stopped accepting, and called every connection's
            # shutdown (in the same step), this one's included.
            wait_until(lambda: _refuses_connections(server), "the server to stop listening")
            sock.sendall(b"\r\n" + body)
            status, headers, _ = _read_response(sock)
            assert status == 201
            assert headers["connection"] == "close"
            assert sock.recv(1) == b""  # then closed
        assert server.wait(timeout=PATIENCE) == 0
    finally:
        server.stop()
    admin = sa.create_engine(database_url)
    try:
        with admin.connect() as conn:
            audited = conn.execute(
                sa.text("SELECT count(*) FROM audit_events WHERE request_id = :r"),
                {"r": "across-shutdown-1"},
            ).scalar_one()
    finally:
        admin.dispose()
    assert audited == 1


def test_a_body_that_stalls_at_shutdown_is_waited_for_until_its_time_limit(
    database_url: str, tmp_path: Path, user: ApiUser
) -> None:
    """A request whose body stops arriving holds the shutdown only until its time limit: a
    408 (`Connection: close`), and the server exits, long before SHUTDOWN_TIMEOUT_SECONDS
    (before, it waited that long, then answered 503)."""
    head = user.raw_head("Content-Length: 60000")
    env = {**_env(database_url), "REQUEST_BODY_TIMEOUT_SECONDS": "5"}
    server = ServeProcess(tmp_path, env).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as sock:
            sock.sendall(head + b'{"title": "never finished')
            server.terminate()
            wait_until(lambda: _refuses_connections(server), "the server to stop listening")
            status, headers, body = _read_response(sock)
            assert (status, headers["connection"]) == (408, "close")
            assert_server_problem(status, headers, body)
            assert sock.recv(1) == b""
        assert server.wait(timeout=PATIENCE) == 0
    finally:
        server.stop()


def test_a_body_answered_before_its_end_frees_its_connection_at_shutdown_once_in(
    database_url: str, tmp_path: Path
) -> None:
    """A body declared longer than MAX_BODY_BYTES gets its 413 at once, and its rest is read
    and dropped, the connection kept for the client's next request. At shutdown, once that
    rest is in, nothing is owed on the connection: it is closed then, not left open until the
    head's time limit (or the shutdown's) as if a next request were on its way."""
    size = 100_000  # over MAX_BODY_BYTES, 64 KiB
    env = {**_env(database_url), "REQUEST_BODY_TIMEOUT_SECONDS": "120"}
    server = ServeProcess(tmp_path, env).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as sock:
            sock.sendall(
                b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (size, b" " * 1000)
            )
            status, headers, _ = _read_response(sock)
            assert (status, headers.get("connection")) == (413, None)
            server.terminate()
            wait_until(lambda: _refuses_connections(server), "the server to stop listening")
            sock.sendall(b" " * (size - 1000))
            # Closed within the socket's timeout (PATIENCE), not at 60 s or more.
            assert sock.recv(1) == b""
        assert server.wait(timeout=PATIENCE) == 0
    finally:
        server.stop()


@pytest.mark.usefixtures("clean_env")
def test_a_request_waiting_unread_in_the_socket_at_shutdown_is_answered() -> None:
    """The bytes of a request may have reached the server's socket but not yet been read by
    its event loop when the server shuts the connection down: the request is answered too
    (the protocol peeks at the socket), not dropped with the connection. Uvicorn's own loop
    and our protocol, in this process, so that the shutdown can come in between, for sure:
    from inside the loop's thread, in one step, the loop cannot read meanwhile."""
    app = FastAPI()

    @app.get("/")
    def root() -> dict[str, bool]:
        return {"ok": True}

    request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    with (
        LiveServer(app, http=BoundedHttpToolsProtocol) as live,
        socket.create_connection(("127.0.0.1", live.port), timeout=PATIENCE) as client,
    ):
        client.sendall(request)
        assert _read_response(client)[0] == 200  # kept alive, and idle
        [protocol] = live.server.server_state.connections
        assert isinstance(protocol, BoundedHttpToolsProtocol)
        server_side = protocol.transport.get_extra_info("socket")

        async def send_then_shut_down() -> None:  # nothing awaited: one step of the loop
            client.sendall(request)
            with socket.fromfd(server_side.fileno(), server_side.family, server_side.type) as peek:
                assert select.select([peek], [], [], PATIENCE)[0], "the request never arrived"
                assert peek.recv(1, socket.MSG_PEEK) == b"G"  # there, unread
            protocol.shutdown()

        asyncio.run_coroutine_threadsafe(send_then_shut_down(), protocol.loop).result(PATIENCE)
        status, headers, body = _read_response(client)
        assert (status, headers["connection"], json.loads(body)) == (200, "close", {"ok": True})
        assert client.recv(1) == b""  # then closed


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"a" * 70_000, 431),  # over 64 KiB
        (b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
    ids=["431", "400 in a body"],
)
@pytest.mark.usefixtures("clean_env")
def test_a_connection_lingering_after_a_refusal_is_closed_at_shutdown_at_once(
    request_: bytes, status: int
) -> None:
    """After the server's refusal a connection lingers (LINGER_SECONDS), reading and dropping
    what the client still sends: the server's shutdown closes it at once, and is not held up
    for it. (After a 400 in a body its request is still open, abandoned: uvicorn's shutdown
    would leave the connection to close after that request's answer, which never comes.)"""
    app = FastAPI()

    @app.post("/")
    async def size(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    with (
        LiveServer(app, http=BoundedHttpToolsProtocol) as live,
        socket.create_connection(("127.0.0.1", live.port), timeout=PATIENCE) as client,
    ):
        client.sendall(request_)
        answer, headers, body = _read_response(client)
        assert answer == status
        assert_server_problem(status, headers, body)
        assert client.recv(1) == b""  # half-closed by the server, and lingering
        client.sendall(b"a" * 1000)
        started = time.monotonic()
        live.server.should_exit = True
        live.thread.join(PATIENCE)
        assert not live.thread.is_alive()
        assert time.monotonic() - started < LINGER_SECONDS / 2
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # closed: a reset
            for _ in range(10):
                client.sendall(b"a")
                time.sleep(0.05)


def test_with_several_workers_new_connections_are_refused_once_all_stop_listening(
    database_url: str, tmp_path: Path
) -> None:
    user_id = random_id()
    user = ApiUser(user_id, create_dev_token(TEST_SECRET, user_id))
    admin = sa.create_engine(database_url)
    server = ServeProcess(tmp_path, _env(database_url), workers=2).start()
    try:
        # One request in flight keeps its worker, and so the server, shutting down.
        with _put_in_flight(admin, server, user) as held:
            server.terminate()
            # Refused while the server still runs: not completed by the kernel, to be left
            # unread until the server exits and then reset.
            wait_until(
                lambda: _refuses_connections(server),
                "new connections to be refused",
                timeout=PATIENCE,
            )
            assert server.process is not None and server.process.poll() is None
            assert not held.put.done()
            response = held.answer()
        assert response.status_code == 200, response.text
        assert response.headers["connection"] == "close"
        assert server.wait(timeout=PATIENCE) == 0
    finally:
        server.stop()
        admin.dispose()


def test_from_sigterm_every_answer_says_connection_close_in_flight_ones_too(
    database_url: str, tmp_path: Path
) -> None:
    """During the drain kept-alive clients (a balancer's pooled connections) are moved off
    the instance: every answer says `Connection: close`, those to requests already being
    worked on at the SIGTERM too, so that no idle connection is left open into the close at
    the drain's end, where a request sent on it would get no answer."""
    user_id = random_id()
    user = ApiUser(user_id, create_dev_token(TEST_SECRET, user_id))
    admin = sa.create_engine(database_url)
    # A drain long enough for the steps below to happen inside it.
    server = ServeProcess(tmp_path, {**_env(database_url), "SHUTDOWN_DRAIN_SECONDS": "15"}).start()
    try:
        with _put_in_flight(admin, server, user) as held:
            server.terminate()
            wait_until(
                lambda: httpx.get(f"{server.url}/readyz").status_code == 503,
                "the drain to begin",
                timeout=PATIENCE,
            )
            # A request that comes now is answered so too.
            draining = httpx.get(f"{server.url}/healthz", timeout=PATIENCE)
            assert (draining.status_code, draining.headers["connection"]) == (200, "close")
            response = held.answer()
        assert response.status_code == 200, response.text
        assert response.headers["connection"] == "close"
        assert server.wait(timeout=PATIENCE * 2) == 0  # once the drain is over
    finally:
        server.stop()
        admin.dispose()
