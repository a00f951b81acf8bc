"""Helpers for the fault, idempotency and hostile-input tests (no tests here).

Everything runs for real on 127.0.0.1: a TCP proxy in front of PostgreSQL that can be cut and
restored, a server that accepts connections and never answers, an HTTP server that counts
what it receives, and an app whose database connections can be found and terminated with
pg_terminate_backend.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI

from service.app import create_app
from service.database import Database, build_engine
from service.settings import Settings
from tests.http_helpers import LocalHttpServer, QuietHandler
from tests.support import LiveServer

POLL_SECONDS = 0.02


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll until `condition()` is truthy (a bounded wait for a state, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


# The app under test, with database connections we can find ---------------------------


@dataclass
class TrackedApp:
    """An app on its own engine, remembering the backend pid of every connection it opened."""

    app: FastAPI
    database: Database
    pids: set[int] = field(default_factory=set)

    def live_pids(self, admin: sa.Engine, state: str | None = None) -> list[int]:
        """The app's backends that still exist, optionally only those in `state`."""
        query = "SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"
        if state is not None:
            query += " AND state = :state"
        with admin.connect() as conn:
            rows = conn.execute(sa.text(query), {"pids": list(self.pids), "state": state})
            return [int(pid) for pid in rows.scalars()]

    def waiting_pids(self, admin: sa.Engine) -> list[int]:
        """The app's backends waiting for a lock."""
        query = (
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids) AND wait_event_type = 'Lock'"
        )
        with admin.connect() as conn:
            return [
                int(p) for p in conn.execute(sa.text(query), {"pids": list(self.pids)}).scalars()
            ]


def lock_waiter(engine: sa.Engine, statement: str) -> int | None:
    """The pid of a backend of this database waiting for a lock in a statement LIKE
    `statement` (psycopg2 sends the values inside the statement's text)."""
    query = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE :statement"
    )
    with engine.connect() as conn:
        pid = conn.execute(sa.text(query), {"statement": statement}).scalar()
    return int(pid) if pid is not None else None


def locked(engine: sa.Engine, query: str, params: dict[str, Any]) -> sa.Connection:
    """A connection of its own holding the row locks `query` takes, until it rolls back."""
    conn = engine.connect()
    conn.execute(sa.text(query), params)
    return conn


TASK_ROW_LOCK = "SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"


def lock_waits(engine: sa.Engine) -> int:
    """How many backends of this database wait for a lock. A connection of its own each time:
    pg_stat_activity is a snapshot taken once per transaction, so a loop on one connection
    would read the same count forever."""
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


def terminate(admin: sa.Engine, pids: list[int]) -> int:
    """pg_terminate_backend each pid; how many were terminated."""
    if not pids:
        return 0
    with admin.connect() as conn:
        query = sa.text(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(:p) pid"
        )
        killed = int(conn.execute(query, {"p": pids}).scalar_one())
        conn.commit()
    return killed


@contextmanager
def tracked_app(
    settings: Settings, url: str | None = None, **overrides: Any
) -> Iterator[TrackedApp]:
    """An app with its own engine (pool) built from `settings` + `overrides`, disposed after."""
    settings = settings.model_copy(update=overrides)
    database = Database(build_engine(settings, url))
    tracked = TrackedApp(create_app(settings, database), database)

    def remember(dbapi_connection: Any, _record: Any) -> None:
        tracked.pids.add(int(dbapi_connection.get_backend_pid()))

    if database.dialect == "postgresql":
        sa.event.listen(database.engine, "connect", remember)
    try:
        yield tracked
    finally:
        database.dispose()


@contextmanager
def live(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


# Network stand-ins ---------------------------------------------------------------------


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def _close_listener(listener: socket.socket) -> None:
    """Stop listening now: a bare close() leaves a thread blocked in accept() accepting."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def server_address(url: sa.URL) -> tuple[str, int] | str:
    """Where the server of `url` listens: (host, port), or the path of its Unix socket."""
    socket_dir = url.query.get("host")
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
    return (url.host or "127.0.0.1", url.port or 5432)


def proxied_url(url: sa.URL, port: int) -> str:
    """`url`, reaching its server through a proxy at 127.0.0.1:`port`."""
    direct = url.difference_update_query(["host"])
    return direct.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, tuple):
        return socket.create_connection(target, timeout=5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target (host and port, or a Unix socket); `cut()` drops
    the listener and every open connection (the database is gone), `restore()` listens on the
    same port again.

    With `frames_server_messages`, what the server sends is split into protocol messages, and
    while `relay_notifications` is false its NotificationResponses ('A') are dropped (counted
    in `notifications_dropped`): a listener whose LISTEN succeeds but that hears nothing, as
    behind a transaction pooler. The clients must then connect without TLS or GSS encryption
    (`sslmode=disable&gssencmode=disable`): the server's one-byte answer to their requests
    is not a message.
    """

    def __init__(
        self, target: tuple[str, int] | str, *, frames_server_messages: bool = False
    ) -> None:
        self.target = target
        self.frames_server_messages = frames_server_messages
        self.relay_notifications = True
        self.notifications_dropped = 0
        self._listener: socket.socket | None = _listen()
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._drop_marker: bytes | None = None
        self.dropped = 0
        self.queries: list[bytes] = []
        self._start_accepting()

    def take_queries(self) -> list[bytes]:
        """The simple-Query texts clients sent since the last call (psycopg2 sends every
        statement, BEGIN and COMMIT included, as one): the round trips, in order."""
        with self._lock:
            queries, self.queries = self.queries, []
        return queries

    def drop_reply_after(self, marker: bytes) -> None:
        """Once: the next connection whose client sends `marker` is cut when the server
        answers it, before the answer reaches the client (the server did the work; the
        client never hears of it)."""
        with self._lock:
            self._drop_marker = marker

    def _start_accepting(self) -> None:
        listener = self._listener
        assert listener is not None
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                first = self._greet(client)
            except OSError:
                first = None
            if first is None:
                client.close()
                continue
            try:
                upstream = _connect(self.target)
                upstream.settimeout(None)
                upstream.sendall(first)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _greet(self, client: socket.socket) -> bytes | None:
        """Before connecting upstream: what to send it first, or None to drop the client."""
        return b""

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        armed = False
        pending = b""  # the start of a server message not yet whole (frames_server_messages)
        try:
            while True:
                for key, _ in selector.select():
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is client:
                        with self._lock:
                            self.queries.extend(_simple_queries(data))
                            marker = self._drop_marker
                            if marker is not None and marker in data:
                                self._drop_marker, armed = None, True
                    elif armed:
                        self.dropped += 1
                        return  # the server's answer is lost with the connection
                    elif self.frames_server_messages:
                        data, pending = self._filter_server_messages(pending + data)
                        if not data:
                            continue
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _filter_server_messages(self, data: bytes) -> tuple[bytes, bytes]:
        """What of `data` to relay (whole messages), and the incomplete rest to keep."""
        relayed = []
        while len(data) >= 5:
            end = 1 + int.from_bytes(data[1:5], "big")
            if len(data) < end:
                break
            message, data = data[:end], data[end:]
            if message[:1] == b"A" and not self.relay_notifications:
                with self._lock:
                    self.notifications_dropped += 1
                continue
            relayed.append(message)
        return b"".join(relayed), data

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            _close_listener(listener)
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def restore(self) -> None:
        with self._lock:
            assert self._listener is None, "the proxy is already up"
            self._listener = _listen(self.port)
        self._start_accepting()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SSL_REQUEST, _GSSENC_REQUEST, _PROTOCOL_3 = 80877103, 80877104, 196608


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("the client went away")
        data += chunk
    return data


class StartupParameterRefusingProxy(TcpProxy):
    """A TcpProxy that answers a StartupMessage carrying one of `refused` parameters as
    PgBouncer does (`ignore_startup_parameters` without it): an ErrorResponse, FATAL, SQLSTATE
    08P01, "unsupported startup parameter: <name>", then closes. Other connections are relayed.
    It declines TLS and GSS encryption (one byte 'N'), as a pooler without TLS does."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        refused: tuple[str, ...] = ("options",),
        *,
        every: tuple[str, str] | None = None,
    ):
        """`every` = (SQLSTATE, message): refuse every connection so instead (a server still
        starting, one out of connections)."""
        self.refused = refused
        self.every = every
        self.refusals = 0
        super().__init__(target)

    def _greet(self, client: socket.socket) -> bytes | None:
        client.settimeout(5)
        first = self._startup(client)
        client.settimeout(None)
        return first

    def _startup(self, client: socket.socket) -> bytes | None:
        while True:
            length = int.from_bytes(_read_exactly(client, 4), "big")
            body = _read_exactly(client, length - 4)
            code = int.from_bytes(body[:4], "big")
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                client.sendall(b"N")
                continue
            break
        if code == _PROTOCOL_3:
            fields = body[4:].split(b"\0")
            names = {name.decode() for name in fields[0:-2:2] if name}
            if self.every is not None:
                return self._refuse(client, *self.every)
            for name in self.refused:
                if name in names:
                    return self._refuse(client, "08P01", f"unsupported startup parameter: {name}")
        return length.to_bytes(4, "big") + body

    def _refuse(self, client: socket.socket, sqlstate: str, message: str) -> None:
        fields = f"SFATAL\0VFATAL\0C{sqlstate}\0M{message}\0".encode()
        error = fields + b"\0"
        client.sendall(b"E" + (4 + len(error)).to_bytes(4, "big") + error)
        with self._lock:
            self.refusals += 1


def _simple_queries(data: bytes) -> list[bytes]:
    """The texts of the simple Query messages ('Q', int32 length, text, NUL) that `data`
    starts with (psycopg2 writes each one whole)."""
    texts = []
    while len(data) >= 5 and data[:1] == b"Q":
        end = 1 + int.from_bytes(data[1:5], "big")
        texts.append(data[5:end].rstrip(b"\0"))
        data = data[end:]
    return texts


class SilentServer:
    """Accepts TCP connections and never sends a byte: a database that hangs at connect, or
    an OTLP collector that never answers."""

    def __init__(self) -> None:
        self._listener = _listen()
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        _close_listener(self._listener)
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountingHttpServer(LocalHttpServer):
    """An HTTP server on 127.0.0.1 that answers everything with 404 and counts requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        owner = self

        class Handler(QuietHandler):
            def _any(self) -> None:
                with owner._lock:
                    owner._count += 1
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _any

        super().__init__(Handler)

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._count


def write_past_the_statement_timeout(
    settings: Settings, admin: sa.Engine, user_headers: dict[str, str], tasks_url: str
) -> Any:
    """A PUT whose UPDATE waits on a row lock held by `admin` past a 300 ms statement timeout:
    PostgreSQL cancels it (57014, query_canceled). Returns the response."""
    from fastapi.testclient import TestClient

    with (
        tracked_app(settings, db_statement_timeout_ms=300) as tracked,
        TestClient(tracked.app, raise_server_exceptions=False) as client,
    ):
        created = client.post(tasks_url, json={"title": "locked"}, headers=user_headers)
        task = created.json()
        holder = locked(admin, TASK_ROW_LOCK, task)
        try:
            return client.put(
                f"{tasks_url}/{task['id']}", json={"title": "changed"}, headers=user_headers
            )
        finally:
            holder.rollback()
            holder.close()
