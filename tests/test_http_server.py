"""The request head under `todo-api serve` (service.httpserver): a bound on its size, time
limits for it and for the body, a lingering close after the server's own refusals, and
ordinary HTTP/1.1 unchanged (keep-alive, pipelining, bodies).

Raw sockets against a real `todo-api serve --workers 2` process: the bound and the timer live
in the HTTP protocol that uvicorn runs in each worker, under the app.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from service.database import Database
from service.httpserver import LINGER_MAX_BYTES, LINGER_SECONDS
from tests.audit_helpers import assert_nothing_written, events_of
from tests.reliability_helpers import TASK_ROW_LOCK, lock_waits, locked, wait_until
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET, ApiUser, assert_server_problem, create_task

MAX_HEAD = 64 * 1024  # MAX_REQUEST_HEAD_BYTES, its default
HEAD_TIMEOUT = 4  # REQUEST_HEAD_TIMEOUT_SECONDS (shorter than the default, for the tests)
BODY_TIMEOUT = 2  # REQUEST_BODY_TIMEOUT_SECONDS, likewise
HUGE_HEADER = 32 * 1024 * 1024
# Long enough for any close the server owes us; a server that never closes fails the test.
PATIENCE = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[ServeProcess]:
    env = {
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "MAX_REQUEST_HEAD_BYTES": str(MAX_HEAD),
        "REQUEST_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
        "REQUEST_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    }
    process = ServeProcess(tmp_path_factory.mktemp("serve"), env, workers=2).start()
    try:
        yield process
    finally:
        process.stop()


class Connection:
    """One client connection: raw bytes out, responses read one after the other."""

    def __init__(self, server: ServeProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)
        self.file: BinaryIO = self.sock.makefile("rb")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line[:200]
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    def refused_and_closed(self, status: int, word: bytes) -> None:
        """The server's own refusal (a 431, 408, 413 or 400, `word` in its `detail`), then its
        close of the connection."""
        answer, headers, body = self.response()
        assert answer == status
        detail = assert_server_problem(status, headers, body)
        assert word.decode() in detail.lower()
        assert self.closed_by_server()

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF); a server that keeps it open fails here."""
        return self.file.read() == b""

    def readable(self, timeout: float = 0) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def send_in_pieces(self, data: bytes, pieces: int = 4) -> None:
        """`data` in `pieces` sends 0.1 s apart, as a client sending its request from a slower
        source does, before it reads: a connection reset meanwhile fails the test here."""
        size = -(-len(data) // pieces)
        for start in range(0, len(data), size):
            self.send(data[start : start + size])
            time.sleep(0.1)

    def send_until_cut_off(self, piece: bytes, pause: float) -> int:
        """Sends `piece` every `pause` seconds, without reading, until the server's close stops
        it (a reset): the bytes sent. A server that never closes fails the test."""
        sent = 0
        deadline = time.monotonic() + PATIENCE
        try:
            while time.monotonic() < deadline:
                self.send(piece)
                sent += len(piece)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        raise AssertionError(f"still open after {PATIENCE} s")


def get(path: str = "/healthz", *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def head_of_size(size: int, *, end: bool = True, method: str = "GET") -> bytes:
    """A request head of exactly `size` bytes (with its blank line when `end`), padded by one
    header, `X-Pad`."""
    start = f"{method} /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: ".encode()
    tail = b"\r\n\r\n" if end else b""
    return start + b"a" * (size - len(start) - len(tail)) + tail


# Size --------------------------------------------------------------------------------------


def test_a_head_one_byte_over_the_bound_is_refused_before_it_ends(server: ServeProcess) -> None:
    """431 and a close as soon as the head passes the bound, without waiting for its end:
    the client has sent MAX_HEAD + 1 bytes and nothing more."""
    with Connection(server) as conn:
        conn.send(head_of_size(MAX_HEAD + 1, end=False))
        conn.refused_and_closed(431, b"header")


def test_a_huge_header_stops_being_read(server: ServeProcess) -> None:
    """A client streaming a 32 MB header gets its 431 and a closed connection long before it
    is done: sending fails (reset by the server) or the answer is there. (Unbounded, 40 MB
    took the server a second of CPU and 200 MB two minutes, with every other client waiting.)"""
    chunk = b"b" * 65536
    sent = 0
    with Connection(server) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: ")
        try:
            while sent < HUGE_HEADER and not conn.readable():
                conn.send(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < HUGE_HEADER
        try:
            status, headers, body = conn.response()
        except ConnectionResetError:
            return  # the server closed with our unread bytes in its buffer: a reset, no 431
        assert status == 431
        assert_server_problem(status, headers, body)


def test_a_huge_trailer_stops_being_read(server: ServeProcess) -> None:
    """A chunked body's trailers are headers too, parsed the same way: a client streaming a
    32 MB trailer has its connection closed long before it is done (unbounded, a 120 MB one
    stalled the worker's other requests for seconds). The answer to the request itself (405:
    /healthz takes no POST) comes first; reading goes on after it, to the message's end."""
    chunk = b"b" * 65536
    sent = 0
    with Connection(server) as conn:
        conn.send(
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: "
        )
        try:
            while sent < HUGE_HEADER:
                conn.send(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < HUGE_HEADER


def test_a_chunked_body_with_a_trailer_is_read_to_its_end(server: ServeProcess) -> None:
    with Connection(server) as conn:
        conn.send(
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 8192 + b"\r\n\r\n"
        )
        assert conn.response()[0] == 405
        conn.send(get())  # the same connection, after the whole message was read
        assert conn.response()[0] == 200


def test_after_a_413_for_a_large_declared_body_the_connection_is_reused(
    server: ServeProcess,
) -> None:
    """A body of a declared length past the app's limit gets its 413 at once; the rest is read
    and dropped, and the connection (kept alive, as the 413 says) serves the next request."""
    size = 1_000_000
    with Connection(server) as conn:
        conn.send(
            f"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        conn.send(b" " * size)
        status, headers, _ = conn.response()
        assert status == 413
        assert headers.get("connection") != "close"
        conn.send(get())
        assert conn.response()[0] == 200


def test_a_chunked_body_at_the_limit_in_one_byte_chunks_is_read_to_its_end(
    server: ServeProcess,
) -> None:
    """64 KiB (the app's limit) in one-byte chunks with an extension each, 10 bytes a chunk:
    framing, not abuse."""
    chunks = b"1;a=b\r\nx\r\n" * (64 * 1024) + b"0\r\n\r\n"
    with Connection(server) as conn:
        conn.send(
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks
        )
        assert conn.response()[0] == 405
        conn.send(get())
        assert conn.response()[0] == 200


def test_a_head_of_exactly_the_bound_is_served(server: ServeProcess) -> None:
    with Connection(server) as conn:
        conn.send(head_of_size(MAX_HEAD))
        status, _, _ = conn.response()
        assert status == 200


def test_a_16_kb_header_is_served(server: ServeProcess) -> None:
    """A large token or cookie is fine: the bound is far above real heads."""
    with Connection(server) as conn:
        conn.send(get("/healthz", "Cookie: session=" + "c" * 16 * 1024))
        status, _, body = conn.response()
        assert status == 200
        assert b'"ok"' in body or b"version" in body


def test_the_read_that_completes_a_head_may_carry_its_body(server: ServeProcess) -> None:
    """Only the head counts: a head just under the bound arriving with its body in the same
    packet is served (405: /healthz takes no POST), and the connection stays usable."""
    body = b'"' + b"x" * 4094 + b'"'
    head = head_of_size(MAX_HEAD - 100, end=False, method="POST")
    fields = f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with Connection(server) as conn:
        conn.send(head + fields.encode() + body)
        status, _, _ = conn.response()
        assert status == 405
        conn.send(get())
        assert conn.response()[0] == 200


# HTTP/1.1 as before ------------------------------------------------------------------------


def test_a_keep_alive_connection_serves_several_requests(server: ServeProcess) -> None:
    with Connection(server) as conn:
        for _ in range(3):
            conn.send(get())
            status, headers, _ = conn.response()
            assert status == 200
            assert headers.get("connection") != "close"


def test_pipelined_requests_are_answered_in_order(server: ServeProcess) -> None:
    ids = [f"pipelined-{n}" for n in range(3)]
    with Connection(server) as conn:
        conn.send(b"".join(get("/healthz", f"X-Request-ID: {rid}") for rid in ids))
        for rid in ids:
            status, headers, _ = conn.response()
            assert status == 200
            assert headers["x-request-id"] == rid


def test_a_pipelined_head_over_the_bound_is_refused_after_the_answers_before_it(
    server: ServeProcess,
) -> None:
    """The oversized head starts inside the same packet as the request before it (where it
    cannot be counted from its first byte): that request is answered, then 431 and a close."""
    with Connection(server) as conn:
        conn.send(get("/healthz", "X-Request-ID: first") + head_of_size(MAX_HEAD + 1000))
        status, headers, _ = conn.response()
        assert (status, headers["x-request-id"]) == (200, "first")
        conn.refused_and_closed(431, b"header")


# Time --------------------------------------------------------------------------------------


@pytest.mark.parametrize("after_a_response", [False, True])
def test_a_head_that_stalls_is_closed(server: ServeProcess, after_a_response: bool) -> None:
    """Part of a head, then nothing: 408 and a close after REQUEST_HEAD_TIMEOUT_SECONDS, on a
    new connection as on a kept-alive one."""
    with Connection(server) as conn:
        if after_a_response:
            conn.send(get())
            assert conn.response()[0] == 200
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        conn.refused_and_closed(408, b"head")


def test_a_connection_that_sends_nothing_is_closed(server: ServeProcess) -> None:
    with Connection(server) as conn:
        assert conn.closed_by_server()


def test_a_head_dribbled_a_line_at_a_time_is_closed(server: ServeProcess) -> None:
    """Each line arriving in time does not extend the limit: it is for the whole head."""
    with Connection(server) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + PATIENCE
        line = 0
        while not conn.readable() and time.monotonic() < deadline:
            conn.send(f"X-Line-{line}: {line}\r\n".encode())
            line += 1
            time.sleep(0.25)
        conn.refused_and_closed(408, b"head")


def test_a_slow_but_steady_head_within_the_limit_is_served(server: ServeProcess) -> None:
    """A head that arrives in pieces over a second (the limit is 4 s) is served."""
    pieces = [b"GET /healthz HTTP/1.1\r\n", b"Host: test\r\n", b"X-Slow: 1\r\n", b"\r\n"]
    with Connection(server) as conn:
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.3)
        assert conn.response()[0] == 200


# The body's time -------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["Content-Length: 60000", "Transfer-Encoding: chunked"])
def test_a_body_that_never_ends_gets_408_and_nothing_is_processed(
    server: ServeProcess, database: Database, user: ApiUser, framing: str
) -> None:
    """A body begun and never finished: 408 and a close after REQUEST_BODY_TIMEOUT_SECONDS
    (before, the connection and the request waited for as long as the client kept it open).
    The app's request saw a disconnect: no task, no audit event, no error logged, and an
    access line that says 408, the answer sent (it said 400, FastAPI's "error parsing the
    body"; the span and the metric: tests/test_body_not_received.py)."""
    log_start = server.log.stat().st_size
    part = b'{"title": "never finished'
    if framing.startswith("Transfer-Encoding"):
        part = b"%x\r\n%s\r\n" % (len(part), part)
    with Connection(server) as conn:
        conn.send(user.raw_head(framing) + part)
        conn.refused_and_closed(408, b"body")
    assert_nothing_written(database.engine, user.user_id)
    access = wait_until(lambda: access_lines(server, log_start), "the access line")
    assert [(line["route"], line["status"]) for line in access] == [("/api/{user_id}/tasks", 408)]
    assert "REQUEST_BODY_TIMEOUT_SECONDS" in server_log_since(server, log_start)
    assert_no_error_logged(server, log_start)


def server_log_since(server: ServeProcess, start: int) -> str:
    """What the server has logged since `start` (a position in its log)."""
    with server.log.open("rb") as log:
        log.seek(start)
        return log.read().decode()


def access_lines(server: ServeProcess, start: int) -> list[dict[str, Any]]:
    """The access lines the server has logged since `start`."""
    lines = server_log_since(server, start).splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    return [line for line in logged if line.get("logger") == "service.access"]


def assert_no_error_logged(server: ServeProcess, start: int) -> None:
    """No stack trace, no unhandled error, no 500 and no ERROR line since `start`."""
    logged = server_log_since(server, start)
    for error in (
        "Traceback",
        "Exception in ASGI application",
        "unhandled error",
        " 500",
        '"ERROR"',
    ):
        assert error not in logged


def test_the_rest_of_a_body_refused_413_is_waited_for_no_longer(server: ServeProcess) -> None:
    """An answer sent before the body's end (413 for a declared length over MAX_BODY_BYTES):
    the rest is read and dropped as it comes, a byte now and then, until the limit closes the
    connection (before, it stayed open for as long as the bytes kept coming)."""
    with Connection(server) as conn:
        conn.send(
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b" " * 1000
        )
        status, headers, _ = conn.response()
        assert status == 413
        assert headers.get("connection") != "close"
        deadline = time.monotonic() + PATIENCE
        try:
            while not conn.readable() and time.monotonic() < deadline:
                conn.send(b" ")
                time.sleep(0.25)
            assert conn.closed_by_server()
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed, with our last bytes unread: a reset


@pytest.mark.parametrize("with_body", [True, False])
def test_a_request_answered_in_time_leaves_no_clock_running(
    server: ServeProcess, user: ApiUser, with_body: bool
) -> None:
    """A body sent in pieces within the limit is served, as is a request without a body; the
    kept-alive connection then serves the next request sent once the limit has passed since
    the first one's head (an idle while shorter than HEAD_TIMEOUT, and than uvicorn's
    keep-alive timeout, 5 s, either of which closes an idle connection)."""
    with Connection(server) as conn:
        if with_body:
            body = b'{"title": "sent in pieces"}'
            conn.send(user.raw_head(f"Content-Length: {len(body)}"))
            for start in range(0, len(body), 10):
                time.sleep(0.2)
                conn.send(body[start : start + 10])
            expected = 201
        else:
            conn.send(get())
            expected = 200
        status, headers, _ = conn.response()
        assert status == expected
        assert headers.get("connection") != "close"
        time.sleep(BODY_TIMEOUT + 0.5)
        conn.send(get())
        assert conn.response()[0] == 200


def test_a_pipelined_body_has_its_time_from_its_turn(
    server: ServeProcess, database: Database, user: ApiUser
) -> None:
    """A request pipelined behind one still being answered is not read until its turn: its
    body's clock starts then. Here a PUT waits for its task's row lock past the limit, with a
    POST's head and half its body behind it; once the PUT is answered, the rest of the body is
    sent and the POST is served. Started at its head, the clock ran out while the PUT waited,
    and a 408 went out ahead of the PUT's answer."""
    with httpx.Client(base_url=server.url) as http:
        task_id = create_task(http, user, "before")["id"]
    put = b'{"title": "after"}'
    post = b'{"title": "pipelined"}'
    holder = locked(database.engine, TASK_ROW_LOCK, {"id": task_id})
    try:
        with Connection(server) as conn:
            conn.send(
                user.raw_request(put, method="PUT", path=f"/{task_id}")
                + user.raw_head(f"Content-Length: {len(post)}")
                + post[:5]
            )
            wait_until(lambda: lock_waits(database.engine) >= 1, "the PUT to wait for the row lock")
            time.sleep(BODY_TIMEOUT + 0.5)
            holder.rollback()
            assert conn.response()[0] == 200
            conn.send(post[5:])
            assert conn.response()[0] == 201
    finally:
        holder.rollback()
        holder.close()


# A lingering close -------------------------------------------------------------------------
# Closed at once after its refusal, a connection on which the client was still sending (the
# rest of a head, a body) was reset by the server's kernel (data unread in the socket, or
# arriving after the close). A client sending its whole request before reading, as most do,
# got "connection reset by peer" from a send and never read its 431; one that had sent all,
# a reset instead of the end of the connection after the answer. (Here on loopback the answer
# itself, already in the client's socket, stayed readable; over a network the reset also
# drops what of it the server has not sent yet.) Now the server half-closes after the answer
# and reads and drops what still comes, for LINGER_SECONDS and LINGER_MAX_BYTES.


def test_a_431_reaches_a_client_that_sends_a_huge_head_before_reading(server: ServeProcess) -> None:
    """A head of 576 KiB sent in one go, far past the bound and past what the server reads
    before it refuses, and 256 KiB more of it in pieces: then the client reads, and gets its
    431 and the close."""
    with Connection(server) as conn:
        conn.send(head_of_size(MAX_HEAD + 512 * 1024, end=False))
        conn.send_in_pieces(b"a" * 256 * 1024)
        conn.refused_and_closed(431, b"header")


@pytest.mark.parametrize(
    "refusal", ["431", "head 408", "body 408", "400 in a head", "400 in a body", "413 then 408"]
)
def test_the_answer_reaches_a_client_that_sends_more_after_it(
    server: ServeProcess, user: ApiUser, refusal: str
) -> None:
    """The server refuses (or its answer, a 413, is out when the body's time is up), and only
    then does the client send the rest of its head or body, in pieces, as one that has not
    looked for an answer yet does; then it reads: the answer, then the close. Nothing of the
    request is processed: no task is created."""
    start, rest, status, word = {
        "431": (head_of_size(MAX_HEAD + 1, end=False), b"a" * 1000 + b"\r\n\r\n", 431, b"header"),
        "head 408": (get()[:-2], b"X-Late: 1\r\n\r\n", 408, b"head"),
        "body 408": (
            user.raw_head("Content-Length: 1000") + b'{"title": "late',
            b" " * 984 + b"}",
            408,
            b"body",
        ),
        "400 in a head": (
            b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: x",
            b"\r\n\r\n" + b" " * 1000,
            400,
            b"invalid",
        ),
        "400 in a body": (
            user.raw_head("Transfer-Encoding: chunked") + b"zz\r\n",
            b'{"title": "late"}\r\n0\r\n\r\n',
            400,
            b"invalid",
        ),
        "413 then 408": (
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b" " * 1000,
            b" " * 1000,
            413,
            b"",
        ),
    }[refusal]
    with Connection(server) as conn:
        conn.send(start)
        assert conn.readable(PATIENCE)
        if refusal == "413 then 408":
            time.sleep(BODY_TIMEOUT + 1)  # the 413 came at once; now the body's time is up
        else:
            time.sleep(0.2)  # the close, sent with the answer, is in too
        conn.send_in_pieces(rest)
        if status == 413:
            assert conn.response()[0] == 413
            assert conn.closed_by_server()
        else:
            conn.refused_and_closed(status, word)
    with httpx.Client(base_url=server.url) as http:
        response = http.get(user.url(), headers=user.headers)
    assert (response.status_code, response.json()) == (200, [])


def test_a_malformed_request_pipelined_behind_another_is_answered_400_after_it(
    server: ServeProcess,
) -> None:
    """The request before it is answered first, in order, then the 400 (uvicorn's was written
    at once, ahead of the answer, which was lost) and the close."""
    malformed = b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: x\r\n\r\n"
    with Connection(server) as conn:
        conn.send(get("/healthz", "X-Request-ID: first") + malformed)
        status, headers, _ = conn.response()
        assert (status, headers["x-request-id"]) == (200, "first")
        conn.refused_and_closed(400, b"invalid")


def test_an_answer_before_a_chunked_body_passes_its_bound_reaches_the_client(
    server: ServeProcess,
) -> None:
    """POST /healthz is answered at once (405); its chunked body, 1.5 MiB sent in pieces before
    the client reads, goes on past 16 x MAX_BODY_BYTES + MAX_HEAD (1.06 MiB), where the
    connection is closed: the client gets its 405, then the close."""
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    with Connection(server) as conn:
        conn.send(
            b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        conn.send_in_pieces(chunk * 24, pieces=8)
        assert conn.response()[0] == 405
        assert conn.closed_by_server()


def test_a_client_that_keeps_sending_after_a_refusal_is_closed_at_the_time_bound(
    server: ServeProcess,
) -> None:
    """A piece every 0.2 s after the 431, never closing: the connection is read for
    LINGER_SECONDS, not longer (what comes does not extend it), then closed."""
    with Connection(server) as conn:
        conn.send(head_of_size(MAX_HEAD + 1, end=False))
        conn.refused_and_closed(431, b"header")
        answered = time.monotonic()
        conn.send_until_cut_off(b"a" * 100, 0.2)
        assert LINGER_SECONDS - 0.5 < time.monotonic() - answered < LINGER_SECONDS + 2


def test_a_client_streaming_without_end_after_a_refusal_is_cut_off_at_the_byte_bound(
    server: ServeProcess,
) -> None:
    """After the 431, as fast as it can: read and dropped up to LINGER_MAX_BYTES, then closed,
    long before the time bound."""
    with Connection(server) as conn:
        conn.send(head_of_size(MAX_HEAD + 1, end=False))
        conn.refused_and_closed(431, b"header")
        answered = time.monotonic()
        sent = conn.send_until_cut_off(b"a" * 65536, 0)
        assert time.monotonic() - answered < LINGER_SECONDS / 2
        assert sent > LINGER_MAX_BYTES


# The server's own answer to a body it stops reading ----------------------------------------
# A body refused by the server (its chunked framing past the bound, or broken) is answered by
# the server in the app's place, after the answers to the requests before it; one whose answer
# is being written is cut off, never written into; and the app's records say what the client
# got. (Found by this session's review: a reset and a 499 for the bound, the 400 of a queued
# request written ahead of the answer before it, a 400 inside an event stream, and a 204 in
# the access line of a DELETE whose client got the body's 408.)


def test_a_chunked_body_past_its_bound_before_any_answer_is_answered_413(
    server: ServeProcess, database: Database, user: ApiUser
) -> None:
    """Chunks of one byte behind 2 kB extensions: little data, much framing, past
    16 x MAX_BODY_BYTES + MAX_HEAD before the app has answered (it waits for the body). The
    client gets a 413 (it got a reset), the access line says 413 (it said 499, a client that
    closed), and nothing is written."""
    log_start = server.log.stat().st_size
    chunk = b"1;e=%s\r\n \r\n" % (b"x" * 2000)
    with Connection(server) as conn:
        conn.send(user.raw_head("Transfer-Encoding: chunked"))
        conn.send_in_pieces(chunk * 600, pieces=6)  # 1.2 MB
        conn.refused_and_closed(413, b"large")
    assert_nothing_written(database.engine, user.user_id)
    access = wait_until(lambda: access_lines(server, log_start), "the access line")
    assert [(line["route"], line["status"]) for line in access] == [("/api/{user_id}/tasks", 413)]
    assert_no_error_logged(server, log_start)


def test_a_broken_body_pipelined_behind_another_request_is_answered_400_after_it(
    server: ServeProcess, user: ApiUser
) -> None:
    """A create, and behind it in the same send a create whose chunked framing breaks. The
    first is answered, then the 400 (uvicorn's was written at once, ahead of the 201, which
    was lost while the task was committed, and logged two stack traces); the second request
    never reached the app."""
    log_start = server.log.stat().st_size
    first = b'{"title": "pipelined first"}'
    with Connection(server) as conn:
        conn.send(
            user.raw_request(first)
            + user.raw_head("Transfer-Encoding: chunked")
            + b'5\r\n{"tit\r\nZZZ\r\n'
        )
        status, _, body = conn.response()
        assert (status, json.loads(body)["title"]) == (201, "pipelined first")
        conn.refused_and_closed(400, b"invalid")
    with httpx.Client(base_url=server.url) as http:
        listed = http.get(user.url(), headers=user.headers).json()
    assert [task["title"] for task in listed] == ["pipelined first"]
    assert_no_error_logged(server, log_start)


def test_a_body_that_breaks_under_an_answer_being_written_cuts_it_off(
    server: ServeProcess, user: ApiUser
) -> None:
    """The change feed's stream answers without reading its request's body; when that body's
    chunked framing breaks, the stream is closed. Uvicorn wrote its 400 into the stream."""
    log_start = server.log.stat().st_size
    with Connection(server) as conn:
        conn.send(
            get(
                f"/api/{user.user_id}/events",
                f"Authorization: Bearer {user.token}",
                "Accept: text/event-stream",
                "Transfer-Encoding: chunked",
            )
            + b"2\r\nhi\r\n"
        )
        status, headers, _ = conn.response()  # its head; the stream goes on
        assert (status, headers["content-type"].split(";")[0]) == (200, "text/event-stream")
        conn.send(b"ZZZ\r\n")
        rest = conn.file.read()  # to the close
    assert b"HTTP/1.1" not in rest
    assert_no_error_logged(server, log_start)


def test_a_delete_whose_body_never_comes_whole_is_not_carried_out(
    server: ServeProcess, database: Database, user: ApiUser
) -> None:
    """A DELETE takes no body, but one was declared and never comes whole: the client gets
    the server's 408, and the task is still there, its history without a deletion, and the
    access line says the 408. (The DELETE was carried out at once: its client was answered
    204, or 408 when the task's lock held the 204 back, for a change that was made.)"""
    with httpx.Client(base_url=server.url) as http:
        task = create_task(http, user, "kept")
    log_start = server.log.stat().st_size
    with Connection(server) as conn:
        conn.send(
            user.raw_head("Content-Length: 10", method="DELETE", path=f"/{task['id']}") + b"{}"
        )
        conn.refused_and_closed(408, b"body")
    # The create's own line may be written after `log_start` was read.
    access = wait_until(
        lambda: [line for line in access_lines(server, log_start) if line["method"] == "DELETE"],
        "the DELETE's access line",
    )
    assert [(line["method"], line["status"]) for line in access] == [("DELETE", 408)]
    with httpx.Client(base_url=server.url) as http:
        assert http.get(user.url(f"/{task['id']}"), headers=user.headers).json() == task
    assert [event["action"] for event in events_of(database.engine, user.user_id)] == [
        "task.created"
    ]
    assert_no_error_logged(server, log_start)


# A client that closes its side -------------------------------------------------------------


def test_a_request_sent_whole_before_a_half_close_is_answered(
    server: ServeProcess, user: ApiUser
) -> None:
    """A create, then the client's `shutdown(SHUT_WR)`: its answer (201) comes, then the
    server's close. Uvicorn's protocol closed at the client's FIN: no answer, the task
    created."""
    body = b'{"title": "half-closed"}'
    with Connection(server) as conn:
        conn.send(user.raw_request(body))
        conn.sock.shutdown(socket.SHUT_WR)
        status, _, answer = conn.response()
        assert (status, json.loads(answer)["title"]) == (201, "half-closed")
        assert conn.closed_by_server()


def test_pipelined_requests_before_a_half_close_are_all_answered(server: ServeProcess) -> None:
    with Connection(server) as conn:
        conn.send(get("/healthz", "X-Request-ID: one") + get("/healthz", "X-Request-ID: two"))
        conn.sock.shutdown(socket.SHUT_WR)
        assert [conn.response()[1]["x-request-id"] for _ in range(2)] == ["one", "two"]
        assert conn.closed_by_server()


def test_a_half_close_with_the_body_incomplete_closes_and_writes_nothing(
    server: ServeProcess, database: Database, user: ApiUser
) -> None:
    """The body can no longer come: closed at once (its app sees a disconnect, logged 499)."""
    log_start = server.log.stat().st_size
    with Connection(server) as conn:
        conn.send(user.raw_head("Content-Length: 100") + b'{"title": "never')
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.closed_by_server()
    access = wait_until(lambda: access_lines(server, log_start), "the access line")
    assert [line["status"] for line in access] == [499]
    assert_nothing_written(database.engine, user.user_id)
    assert_no_error_logged(server, log_start)


def test_a_half_close_behind_a_pipelined_refused_body_still_gets_every_answer(
    server: ServeProcess, user: ApiUser
) -> None:
    """A list, a create and a create whose chunked framing breaks, in one send, then the
    client's half-close: the three answers, in order, then the close. (The refused body was
    still counted as awaited, so the FIN closed the connection while the create ran: it was
    committed, and neither its 201 nor the 400 went out.)"""
    body = b'{"title": "between"}'
    with Connection(server) as conn:
        conn.send(
            get(user.url(), f"Authorization: Bearer {user.token}")
            + user.raw_request(body)
            + user.raw_head("Transfer-Encoding: chunked")
            + b"ZZ\r\nbroken\r\n"
        )
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.response()[0] == 200
        assert conn.response()[0] == 201
        started = time.monotonic()
        conn.refused_and_closed(400, b"invalid")
        # Closed with its answer, not after a linger: the client has closed its side.
        assert time.monotonic() - started < LINGER_SECONDS


def test_a_refused_body_queued_at_sigterm_is_still_answered(
    tmp_path: Path, database_url: str, database: Database, user: ApiUser
) -> None:
    """A PUT held by its task's row lock, a GET and a create whose chunked framing breaks,
    pipelined, then SIGTERM: the PUT's and the GET's answers, then the 400, then the close.
    (SIGTERM's `Connection: close` went on the GET, whose end closed the connection before
    the 400 that was to follow it.)"""
    serve = ServeProcess(
        tmp_path,
        {
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "SHUTDOWN_DRAIN_SECONDS": "0",
            "DB_STATEMENT_TIMEOUT_MS": "120000",
        },
    ).start()
    try:
        with httpx.Client(base_url=serve.url) as http:
            task_id = create_task(http, user, "before")["id"]
        put = b'{"title": "after"}'
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": task_id})
        try:
            with Connection(serve) as conn:
                conn.send(
                    user.raw_request(put, method="PUT", path=f"/{task_id}")
                    + get("/healthz", "X-Request-ID: second")
                    + user.raw_head("Transfer-Encoding: chunked")
                    + b"ZZ\r\nbroken\r\n"
                )
                wait_until(lambda: lock_waits(database.engine) >= 1, "the PUT to wait")
                serve.terminate()
                time.sleep(0.5)  # the SIGTERM handled
                holder.rollback()
                assert conn.response()[0] == 200
                assert conn.response()[1]["x-request-id"] == "second"
                conn.refused_and_closed(400, b"invalid")
        finally:
            holder.rollback()
            holder.close()
        assert serve.wait(timeout=PATIENCE) == 0
    finally:
        serve.stop()
