"""The HTTP/1.1 protocol `todo-api serve` runs: uvicorn's httptools protocol, with a bound on
the size of a request head and time limits for it and for the body.

Uvicorn's httptools protocol (the fast one, picked when httptools is installed) reads a request
head of any size, and its parser joins a long header value piece by piece, at a cost that grows
faster than the value: one client sending a 120 MB header held up every other request for
seconds. Nor does anything close a connection whose head or body never ends (uvicorn's
keep-alive timeout only closes an idle connection after a response, until its first byte
arrives). Here:

- **Size.** The bytes of a head (request line, headers, the blank line) are counted as they
  arrive, and the parser is never given more than `MAX_REQUEST_HEAD_BYTES` of one head: one
  byte more, and the answer is 431 (after the answers to the requests before it, pipelined)
  and the connection is closed, without parsing further.
  (A head that begins inside the read that ended the request before it, as a pipelined one
  may, is counted from the next read and measured whole once parsed: the parser holds at most
  that one read more of it.)
- **A chunked body.** Its chunks' framing and its trailers (the headers after the last
  chunk, which the parser joins as it joins a head's) come with it: such a body may take at
  most 16 x `MAX_BODY_BYTES` + `MAX_REQUEST_HEAD_BYTES` (the app refuses a body over
  `MAX_BODY_BYTES` with 413; a one-byte chunk takes 6 bytes, 10 with a short extension); past
  that, nothing more of it is parsed, and the server answers 413 itself, as it refuses a
  body (below). A body of a declared length is
  parsed at a constant cost per byte: one past the app's limit is read and dropped after its
  413, as uvicorn does, so the connection stays usable.
- **Time.** A head must be complete within `REQUEST_HEAD_TIMEOUT_SECONDS` of the connection
  opening, or of the previous response on a kept-alive connection (while a request is being
  answered, none is awaited). Otherwise the connection is closed, with a 408 if part of the
  head had come. A body must be complete within `REQUEST_BODY_TIMEOUT_SECONDS` of its head
  (of its request's turn, for one pipelined behind another, which is not read before). Else,
  the server answers 408 itself, as it refuses a body (below).
- **A malformed request.** Uvicorn's own 400 goes out as the 431 does: after the answers to
  the requests before it (uvicorn wrote it at once, ahead of them, and they were lost, and
  into an answer being written). In a body, as the server refuses a body.
- **A body refused by the server** (past its time, past the chunked bound, or malformed):
  its request queued behind another (pipelined) never reached the app, and is answered
  after the requests before it; one whose app waits for the body is answered in the app's
  place: the app's request sees a disconnect first (its wait for the body ends, what it sends
  after is dropped: nothing of it is processed; a write that takes no body, a DELETE, reads
  one sent before it acts), and the status sent is left on its state (`service.jsonbody`),
  which the app's records (access line, span, metric) give. One whose answer is out (a 413
  before the body's end) gets no other, and one whose answer is being written (a stream that
  reads no body) is cut off: its sends are dropped, and the connection is closed.
- **The answers.** Each of these refusals (400, 408, 413, 431) is RFC 9457 problem+json, of
  the app's errors' shape and types (`service.problem_types`: `malformed-request`,
  `request-timeout`, `body-too-large`, `request-head-too-large`; uvicorn's own 400 was plain
  text), with the server's default headers and `connection: close`, and none of the app's
  (no `X-Request-ID`, no CORS headers): it answers no request the app has. All of it but the
  status line and the `date` is built once, at import (`Refusal`).
- **A lingering close.** Each of these refusals (431, 408, 400, 413), and a body refused
  once its answer (a 413) is out, ends with a lingering close (RFC 9112 section 9.6, nginx's
  lingering_close): the connection is half-closed once the answer is written (a FIN), and
  what the client still sends, the rest of a head or a body, is read and dropped until it
  closes its side, for `LINGER_SECONDS` at most, and `LINGER_MAX_BYTES`. Closed at once, with
  unread data in the socket or data arriving after, Linux answers with a reset: a client
  still sending gets "connection reset by peer" from its send, and one that sends all of its
  request before it reads, as most do, never reads its 431 (the reset also drops what of the
  answer the server has not sent yet, and some clients' kernels drop what they have not
  read). Not over TLS, which cannot half-close. A shutdown closes a lingering connection at
  once, and none lingers from then on.
- **A client that closes its side** (a half-close, once its request is sent): the requests
  it sent whole are answered, then the connection is closed (uvicorn closed at once, and a
  request being processed went unanswered, its change made); a stream (the change feed)
  goes on until the client closes the connection whole.
- **A peer gone silent.** Each connection's socket gets `TCP_USER_TIMEOUT` (Linux) of
  `TCP_USER_TIMEOUT_SECONDS`: the kernel aborts a connection whose sent data stays
  unacknowledged that long, and the app sees a disconnect. Without it, a client that vanished
  without a FIN or RST (a lid shut, a network switched, a NAT mapping dropped) keeps a feed
  stream, and its slot, until Linux gives up retransmitting, about 15 minutes: the stream's
  heartbeats go into the send buffer, which never fills. A live client acks within seconds.
  (Linux 5.11 and later also abort one whose client keeps its receive window shut, reading
  nothing, that long while data waits to be sent: a stream closes such a client sooner, after
  `FEED_SEND_TIMEOUT_SECONDS`, and any other response is cut off only for a client that has
  not read for that long.) TCP keepalive would not do: it probes only a connection with
  nothing unacknowledged, and a stream heartbeats. Set once per connection, where the option
  exists; elsewhere, skipped.
- **Shutdown.** Uvicorn's shutdown closes every connection not answering a request at once,
  even one whose next request has begun to arrive: the bytes it read (or that wait unread in
  the socket) are dropped, and the client gets a closed connection for a request it cannot
  tell was not processed. Here such a request is read and answered, with `Connection: close`
  (a head that stalls is closed at its time limit, or without an answer when the shutdown's
  time is up, if that comes first: it holds the shutdown no longer; a refusal from then on
  closes without lingering); a connection with nothing
  of a request is closed, as uvicorn does, and so is one whose request was answered before its
  body ended (a 413) once the rest is in. Before that, from SIGTERM and through the drain
  (`SHUTDOWN_DRAIN_SECONDS`), every response says `Connection: close`: kept-alive clients
  move to a new connection (another instance, once the balancer has taken this one out)
  rather than leave an idle one open into the close at the drain's end.

Everything else (keep-alive, pipelining, bodies, upgrades) is uvicorn's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from service.jsonbody import SERVER_ANSWERED
from service.lifecycle import at_sigterm, sigterm_received
from service.problem_types import PROBLEM_JSON, ProblemType, problem_json
from service.settings import get_settings

log = logging.getLogger(__name__)

# The head of a request plus its final blank line, at the least: method SP target SP
# HTTP/1.1 CRLF, then name ":" value CRLF for each header, then CRLF.
_REQUEST_LINE_OVERHEAD = len(b"  HTTP/1.1\r\n") + len(b"\r\n")
_HEADER_OVERHEAD = len(b":\r\n")
# Linux's; None where the platform has no such option (macOS, Windows).
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)

LINGER_SECONDS = 3.0
"""How long a connection stays open after the server's own refusal, half-closed, reading and
dropping what the client still sends (see "A lingering close" in the module's docstring): long
enough for a client to send what it had under way and read the answer, and a fixed total, not
extended by what arrives, so that no client holds the connection longer."""

LINGER_MAX_BYTES = 1024 * 1024
"""At most this much is read and dropped in that time: more than the rest of any request a
client means (a head past the bound is none, a body over MAX_BODY_BYTES gets a 413), and a
client streaming without end is cut off after it, not read at full speed for the whole time."""


@dataclass(frozen=True)
class Refusal:
    """An answer the server writes itself, outside any request: RFC 9457 problem+json, the
    shape of the app's errors (`service.problem_types.problem_body`), so that a client meets
    one shape of error. All of it but the status line and the server's default headers
    (`date`, which changes), built once: nothing of a request is at hand to vary it."""

    status: int
    rest: bytes
    """After the default headers: the content headers, `connection: close`, the body."""

    @classmethod
    def of(cls, kind: ProblemType, detail: str) -> Refusal:
        body = problem_json(kind, detail)
        rest = b"".join(
            [
                b"content-type: " + PROBLEM_JSON.encode("ascii") + b"\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        return cls(kind.status, rest)


HEAD_TOO_LARGE = Refusal.of(
    ProblemType.request_head_too_large,
    "The request line and headers are larger than the server reads (MAX_REQUEST_HEAD_BYTES).",
)
HEAD_TIMED_OUT = Refusal.of(
    ProblemType.request_timeout,
    "The request head was not received in time (REQUEST_HEAD_TIMEOUT_SECONDS).",
)
BODY_TIMED_OUT = Refusal.of(
    ProblemType.request_timeout,
    "The request body was not received in time (REQUEST_BODY_TIMEOUT_SECONDS).",
)
# Uvicorn's parser refuses bytes with one message, `Invalid HTTP request received.`, which it
# logs; where they were (the head, or a chunked body's framing) is known here.
MALFORMED_HEAD = Refusal.of(
    ProblemType.malformed_request, "Invalid HTTP request: its head could not be parsed."
)
MALFORMED_BODY = Refusal.of(
    ProblemType.malformed_request,
    "Invalid HTTP request: its body's chunked framing could not be parsed.",
)
CHUNKED_BODY_TOO_LARGE = Refusal.of(
    ProblemType.body_too_large,
    "The chunked request body, with its framing and trailers, is far larger than the server "
    "takes (MAX_BODY_BYTES).",
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn.run(http=BoundedHttpToolsProtocol)`: one instance per connection."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = get_settings()
        self.max_head_bytes = settings.max_request_head_bytes
        self.max_chunked_bytes = 16 * settings.max_body_bytes + settings.max_request_head_bytes
        self.head_timeout = settings.request_head_timeout_seconds
        self.body_timeout = settings.request_body_timeout_seconds
        self.user_timeout_ms = round(settings.tcp_user_timeout_seconds * 1000)
        # A head is awaited from the connection's start and after each message's end, until
        # the parser has all of it.
        self._in_head = True
        self._head_bytes = 0  # of the awaited head, counted as they arrive
        # False when the head began inside the read that ended the message before it (a
        # pipelined request): its first bytes were not counted, and it is measured whole
        # once parsed.
        self._head_counted = True
        self._head_started = False  # a byte of it has come
        self._heads_parsed = 0
        self._message_ended_in_read = False
        self._chunked = False  # the message being read has a chunked body
        self._rest_bytes = 0  # of the message after its head, counted as they arrive
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # the last head parsed has a body not yet complete
        self._body_timer: asyncio.TimerHandle | None = None
        # The request before the last one parsed: the latest again if that one is dropped
        # from the pipeline, refused before it reached the app.
        self._previous_cycle: RequestResponseCycle | None = None
        # Nothing more is parsed: refused (the answer, if one is owed, goes out after the
        # responses before it), or lingering.
        self._refused = False
        self._refusal: Refusal | None = None  # the refusal's answer, once refused
        self._lingering = False  # answered, half-closed: reading and dropping until the close
        self._linger_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._closing = False  # shut down with a request arriving: answer it, then close
        self._shut_down = False  # shutdown() was called: no lingering from then on

    # Reading -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _servers.add(self.server_state)
        self._set_user_timeout(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    # asyncio's Protocol.eof_received may return True to keep the transport half-open; uvicorn
    # types its own as returning None (it always closes).
    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client closed its side of the connection (a half-close: `shutdown(SHUT_WR)`
        once its request is sent, as `nc -N` and some scripts do). Nothing more will come,
        but what it sent whole is answered, and the connection closed after the last answer:
        uvicorn's protocol closed at once, and a request being processed went unanswered,
        its change made. A request whose body is still incomplete never will be: closed at
        once, as before (its app sees a disconnect)."""
        if self._lingering or self._body_pending or not self._answering():
            return None  # the transport closes
        if not self._refused:  # else its refusal goes out after the answers, then closes
            self.cycle.keep_alive = False
        return True  # half-open: the answers go out

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        if self._refused:
            # Answered once the responses before it are out: nothing more is read until then.
            self.flow.pause_reading()
            return
        self._message_ended_in_read = False
        if not self._in_head:
            self._rest_bytes += len(data)
            if self._chunked and self._rest_bytes > self.max_chunked_bytes:
                self._refuse_chunked_body()
                return
            super().data_received(data)
            return
        room = self.max_head_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # More than the head may still take: give the parser only that much. If it does not
        # end the head, the head is too large; if it does, the rest is the body or the next
        # request, read as such.
        heads_parsed = self._heads_parsed
        self._head_bytes += room
        super().data_received(data[:room])
        if (
            self._refused
            or self.transport.is_closing()
            or self.transport.get_protocol() is not self
        ):
            return  # refused as invalid (a 400), or upgraded (uvicorn drops what follows the head)
        if self._heads_parsed == heads_parsed:
            self._refuse_head()
        else:
            self.data_received(data[room:])

    # Parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._head_started = True
        # Begun after the previous message ended in this same read: not counted from its start.
        self._head_counted = not self._message_ended_in_read
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._stop_head_timer()
        self._in_head = False
        self._heads_parsed += 1
        if not self._head_counted and self._parsed_head_size() > self.max_head_bytes:
            self._refuse_head()
            return
        self._chunked, has_body = self._body_framing()
        previous = self.cycle
        super().on_headers_complete()
        self._previous_cycle = previous
        if self.cycle is None or self.cycle.scope is not self.scope:
            return  # an upgrade: the connection is the WebSocket protocol's from here
        if self._closing or sigterm_received():
            self.cycle.keep_alive = False  # answered with `Connection: close`
        self._body_pending = has_body
        self._await_body()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return  # the refused request's: not the request before it's
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_pending = False
        self._stop_body_timer()
        if self._refused:
            return
        self._message_ended_in_read = True
        self._in_head = True
        self._head_bytes = 0
        self._rest_bytes = 0
        self._chunked = False
        self._head_counted = True
        self._head_started = False
        super().on_message_complete()
        self._await_head()
        if self._closing:
            # After what else this read holds (a pipelined head) is parsed.
            self.loop.call_soon(self._close_if_nothing_owed)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._refused:
            if self._refusal is not None and not self._lingering and not self._answering():
                self._send_and_close(self._refusal)
        else:
            self._await_head()
            self._await_body()  # of the pipelined request started now, if still arriving

    def _set_user_timeout(self, transport: asyncio.Transport) -> None:
        """TCP_USER_TIMEOUT on the connection's socket (see the module's docstring)."""
        sock = transport.get_extra_info("socket")
        if _TCP_USER_TIMEOUT is None or not self.user_timeout_ms or sock is None:
            return
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket (uvicorn's --uds) has no retransmissions to bound
        with contextlib.suppress(OSError):  # refused: the connection keeps the kernel's
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, self.user_timeout_ms)

    # Shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Called by the server once it has stopped accepting: close the connection when no
        request is on it; a request being answered closes it after its response (uvicorn's),
        and so does one whose first bytes came (or wait unread) when this is called. A
        lingering connection is closed at once, and none lingers from here on. One with a
        refusal owed (queued behind answers) is closed by it."""
        self._shut_down = True
        if self._lingering:
            self.transport.close()
            return
        if self._closing or (self._refusal is not None and not self.transport.is_closing()):
            return  # closed after the answers owed (a refusal's, after those before it)
        if self._answering() or self._refused or self.transport.is_closing():
            super().shutdown()
        elif self._head_started or self._bytes_waiting():
            self._closing = True
            log.info("shutdown: answering the request arriving from %s, then closing", self._peer())
        else:
            super().shutdown()

    def _close_if_nothing_owed(self) -> None:
        """At shutdown, once a message is in: close if no request is left on the connection.
        A request answered before its body ended (a 413) had its body's rest read and dropped;
        kept open, the connection would wait for a next request until the head's time limit."""
        if not (
            self.transport.is_closing()
            or self._answering()
            or self._head_started
            or self._bytes_waiting()
        ):
            self.transport.close()

    def _bytes_waiting(self) -> bool:
        """Bytes of a request wait unread in the connection's socket."""
        transport_socket = self.transport.get_extra_info("socket")
        if transport_socket is None:
            return False
        try:
            # A duplicate of the descriptor, to peek without reading what the loop will read.
            with socket.fromfd(
                transport_socket.fileno(), transport_socket.family, transport_socket.type
            ) as peek:
                return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (EAGAIN), or the connection is gone
            return False

    # The head's size and time --------------------------------------------------------------

    def _parsed_head_size(self) -> int:
        """The fewest bytes the head just parsed can have taken."""
        size = len(self.parser.get_method()) + len(self.url) + _REQUEST_LINE_OVERHEAD
        for name, value in self.headers:
            size += len(name) + len(value) + _HEADER_OVERHEAD
        return size

    def _peer(self) -> str:
        return "{}:{}".format(*self.client) if self.client else "?"

    def _answering(self) -> bool:
        """A request is being answered, or waits its turn (pipelined)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse_head(self) -> None:
        log.warning(
            "request head over %d bytes (MAX_REQUEST_HEAD_BYTES) from %s: 431",
            self.max_head_bytes,
            self._peer(),
        )
        self._refuse(HEAD_TOO_LARGE)

    def _refuse(self, refusal: Refusal) -> None:
        """A request refused before it reached the app: nothing more is parsed, and the answer
        goes out after the responses to the requests before it, in their order."""
        self._refused = True
        self._refusal = refusal
        self._stop_head_timer()
        self.flow.pause_reading()
        if not self._answering():
            self._send_and_close(refusal)

    def send_400_response(self, msg: str) -> None:
        """Uvicorn's answer to bytes its parser refuses (it has logged `msg`), which it wrote
        at once, in plain text, and followed with a close, ahead of the answers to the
        requests before it (which were lost) and into one being written. Here, as the other
        refusals (problem+json, `malformed-request`): in a head, after the responses before
        it; in a body, as `_refuse_body` says."""
        if self._refused:
            return  # in the rest of the read that refused a request: answered for that
        if self._in_head:
            self._refuse(MALFORMED_HEAD)
        else:
            self._refuse_body(MALFORMED_BODY)

    def _refuse_body(self, refusal: Refusal) -> str:
        """Nothing more of this body is parsed. Its request queued behind another (pipelined)
        never reached the app: it is dropped, and answered after the requests before it. One
        whose app waits for the body is answered in the app's place (`_answer_for_app`).
        One whose answer is out (a 413 before the body's end) gets no other: the connection
        lingers. One whose answer is being written is cut off: its app's sends are dropped
        from here, and the connection is closed (a half-close would cut it all the same).
        Says which, for the log."""
        self._refused = True
        self._body_pending = False  # nothing more of it is read
        self._stop_body_timer()
        cycle = self.cycle
        if self.pipeline:
            self.pipeline.popleft()  # this request's: the newest, queued last
            assert self._previous_cycle is not None  # queued: behind a request
            self.cycle = self._previous_cycle
            self._refuse(refusal)
            return f"{refusal.status}, after the answers before it"
        if not cycle.response_started:
            self._answer_for_app(cycle, refusal)
            return str(refusal.status)
        if cycle.response_complete:
            self._linger()
            return "answered before; lingering close"
        cycle.disconnected = True
        self.transport.close()
        return "answer cut off; connection closed"

    def _refuse_chunked_body(self) -> None:
        """A chunked body (or its trailers) far past what the app takes: refused with 413, as
        `_refuse_body` refuses a body."""
        outcome = self._refuse_body(CHUNKED_BODY_TOO_LARGE)
        log.warning(
            "chunked request body with its framing and trailers over %d bytes from %s: %s",
            self.max_chunked_bytes,
            self._peer(),
            outcome,
        )

    def _await_head(self) -> None:
        """Start the head's clock, when a head is awaited and no request is being answered."""
        if (
            self._head_timer is None
            and self._in_head
            and not self._refused
            and not self._answering()
            and not self.transport.is_closing()
        ):
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self._send_and_close(HEAD_TIMED_OUT)
        else:
            self.transport.close()  # nothing came: nobody to answer

    # The body's time ------------------------------------------------------------------------

    def _body_framing(self) -> tuple[bool, bool]:
        """Whether the head just parsed has a chunked body, and whether it announces a body at
        all (the parser has refused a malformed length): one pass over its headers."""
        chunked = length = False
        for name, value in self.headers:
            if name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
            elif name == b"content-length":
                with contextlib.suppress(ValueError):
                    length = length or int(value) > 0
        return chunked, chunked or length

    def _await_body(self) -> None:
        """Start the body's clock once its request is the one being answered: one pipelined
        behind another is not read until that one's response is out."""
        if (
            self._body_timer is None
            and self._body_pending
            and not self.pipeline
            and not self.transport.is_closing()
        ):
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        # Its request is the one being answered: a queued one's clock has not started.
        outcome = self._refuse_body(BODY_TIMED_OUT)
        log.warning(
            "request body not complete %s s (REQUEST_BODY_TIMEOUT_SECONDS) after its head "
            "from %s: %s",
            self.body_timeout,
            self._peer(),
            outcome,
        )

    def _answer_for_app(self, cycle: RequestResponseCycle, refusal: Refusal) -> None:
        """The server's own answer to a request whose body it will not finish reading. The
        app's request sees a disconnect first: its wait for the body ends with
        `http.disconnect`, and anything it sends from here on is dropped (a `100 Continue`
        too: nothing may be written after the half-close). The status is left on the
        request's state, so that the app's records give it, not a client that closed
        (service.jsonbody)."""
        cycle.scope["state"][SERVER_ANSWERED] = refusal.status
        cycle.disconnected = True
        cycle.waiting_for_100_continue = False
        cycle.message_event.set()
        self._send_and_close(refusal)

    def _send_and_close(self, refusal: Refusal) -> None:
        """The server's own answer, outside any request (a `Refusal`: problem+json, after the
        server's default headers, as uvicorn writes its own 400), then a lingering close."""
        content = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(refusal.rest)
        self.transport.write(b"".join(content))
        self._linger()

    def _linger(self) -> None:
        """After the server's last answer on the connection: half-close it (a FIN once the
        answer is sent), and read and drop what the client still sends, until it closes its
        side, or for `LINGER_SECONDS`, or `LINGER_MAX_BYTES`. Closed at once instead, data
        unread in the socket, or arriving after, makes the kernel answer with a reset, which
        a client still sending gets from its send, before it reads the answer."""
        self._refused = True
        self._stop_head_timer()
        self._stop_body_timer()
        self._unset_keepalive_if_required()
        if self._shut_down or not self.transport.can_write_eof():
            self.transport.close()  # at shutdown, no waiting; TLS cannot half-close
            return
        self._lingering = True
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)


# The server of each connection made (one per worker process under `todo-api serve`).
_servers: weakref.WeakSet[ServerState] = weakref.WeakSet()


def _close_after_responses() -> None:
    """At SIGTERM: every request whose response has not begun, in flight or queued behind
    another (pipelined), is answered with `Connection: close`, as those that come later are
    (`on_headers_complete`). Runs in the signal handler, on the event loop's thread."""
    for server in list(_servers):
        for protocol in list(server.connections):
            if not isinstance(protocol, BoundedHttpToolsProtocol):
                continue
            if protocol._refusal is not None:
                continue  # its refusal closes, after the answers before it
            pending = [protocol.cycle, *(cycle for cycle, _ in protocol.pipeline)]
            for cycle in pending:
                if cycle is not None and not cycle.response_started:
                    cycle.keep_alive = False


at_sigterm(_close_after_responses)


class Supervisor(Multiprocess):
    """Uvicorn's supervisor of `--workers N`, which closes its copy of the listening socket
    when it stops the workers.

    Uvicorn's keeps it open until the last worker has exited, long after each worker closed
    its own: in the meantime the kernel still completed every new connection, and queued it
    where no worker would ever accept it; each client sent its request, waited for the whole
    shutdown, and was reset. With the supervisor's copy closed, the socket closes with the
    workers' (after their drain), and a connection attempt from then on is refused: the
    client knows that nothing was sent.
    """

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()
