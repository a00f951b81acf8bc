"""One LISTEN connection per worker process, waking that worker's feed streams.

A trigger on `audit_events` notifies channel `audit_events` with `seq:user_id` when the
writing transaction commits. The hub reads those notifications on a dedicated psycopg2
connection watched by the event loop (`loop.add_reader`: no thread, no polling) and wakes the
streams of that user. A notification carries no content: a woken stream reads what it has not
sent yet from the table (`seq > last sent`), so a lost notification can delay an event but
never lose or repeat one. When the connection drops, the hub reconnects with backoff and wakes
every stream, which then catches up from the table.

A connection that accepted `LISTEN` may still never hear anything: through a transaction
pooler (PgBouncer, Neon's `-pooler` host) the server connection that ran `LISTEN` goes back to
the pooler's pool, and its notifications reach no client. So each new listening connection is
verified before streams are accepted: a probe notification is sent on the channel from another
connection (to the pool's database, where the writes come from) and must arrive on the listening
one within PROBE_TIMEOUT_SECONDS. Its payload is not `seq:user_id`, so streams (of every version
of the service) ignore it. Streams are accepted while a listener is being verified (they catch
up from the table once it is, as after any reconnect); when the probe does not arrive, the hub
logs an ERROR naming the fix, ends the streams still open (the client is told, and reconnects
to another instance or to a 503: new streams are refused until a listener is verified), and
tries again with backoff (each attempt's LISTEN, behind a pooler, stays on whichever server
connection ran it, until the pooler retires that connection: the ERROR's fix ends that too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from observability.logging import failure_reason
from service.exceptions import FeedUnavailable, TooManyStreams

log = logging.getLogger("service.events")

CHANNEL = "audit_events"
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 10.0

# The listener's check that it really receives (see the module's docstring).
PROBE_PREFIX = "probe:"
PROBE_TIMEOUT_SECONDS = 5.0
# Between attempts while the probe does not arrive, and how often that is logged again.
DEAF_RETRY_FIRST, DEAF_RETRY_MAX = 5.0, 60.0
DEAF_LOG_EVERY_SECONDS = 600.0

# `FeedHub.state`, as /readyz reports it.
CONNECTING = "connecting"  # no verified listener yet (starting, or reconnecting)
OK = "ok"  # the listener is verified: it receives what the database's writers notify
NOT_RECEIVING = "not_receiving"  # its probe did not arrive: a pooler in between, most likely
STOPPED = "stopped"  # the hub is not running (no lifespan, or shut down)
# The `end` reason of streams open when a new listener turns out not to receive.
FEED_UNAVAILABLE = "feed_unavailable"


class Subscription:
    """One open stream: woken when its user's chain grows, or closed with a reason."""

    __slots__ = ("_wake", "last_seq", "reason", "user_id")

    def __init__(self, user_id: str, last_seq: int) -> None:
        self.user_id = user_id
        self.last_seq = last_seq
        self.reason: str | None = None
        self._wake = asyncio.Event()

    def notify(self, seq: int) -> None:
        if seq > self.last_seq:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._wake.set()

    def clear(self) -> None:
        """Forget earlier wake-ups: called before reading the table, so none is missed."""
        self._wake.clear()

    async def wait(self, timeout: float) -> None:
        """Until woken, closed, or `timeout` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))


def parse_payload(payload: str) -> tuple[str, int] | None:
    """`seq:user_id` as the trigger writes it; None for anything else."""
    seq, sep, user_id = payload.partition(":")
    if not sep or not seq.isdigit() or not user_id:
        return None
    return user_id, int(seq)


class FeedHub:
    """The worker's streams by user, their limits, and the listening connection."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        probe: Callable[[str, str], None],
        max_streams_per_user: int,
        max_streams_per_worker: int,
    ) -> None:
        self._connect = connect
        # probe(channel, payload): notify from a connection other than the listening one.
        self._send_probe = probe
        self.max_streams_per_user = max_streams_per_user
        self.max_streams_per_worker = max_streams_per_worker
        self._streams: dict[str, set[Subscription]] = {}
        self._count = 0
        self._closed = False
        self._starts = 0
        self._runner: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        # The probe awaited by the listening connection: its payload, and what it completes.
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        self._state = CONNECTING
        self._deaf_logged_at: float | None = None
        self.listening = False
        self.connections_made = 0
        self.probes_missed = 0

    @property
    def state(self) -> str:
        """`ok`, `connecting`, `not_receiving` or `stopped` (see the constants)."""
        if self._closed or self._runner is None:
            return STOPPED
        return self._state

    # Streams --------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return self._count

    def subscribe(self, user_id: str, last_seq: int) -> Subscription:
        if self._closed or self._runner is None:
            raise FeedUnavailable("The change feed is not running on this server.")
        if self._state == NOT_RECEIVING:
            raise FeedUnavailable(
                "The change feed cannot receive changes on this server; try again later."
            )
        if self._count >= self.max_streams_per_worker:
            raise TooManyStreams(
                f"This server already holds {self.max_streams_per_worker} feed streams; "
                "try again later."
            )
        streams = self._streams.setdefault(user_id, set())
        if len(streams) >= self.max_streams_per_user:
            raise TooManyStreams(
                f"At most {self.max_streams_per_user} feed streams per user are allowed on "
                "one server; close another one first."
            )
        subscription = Subscription(user_id, last_seq)
        streams.add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        streams = self._streams.get(subscription.user_id)
        if streams is None or subscription not in streams:
            return
        streams.discard(subscription)
        self._count -= 1
        if not streams:
            del self._streams[subscription.user_id]

    def _wake_all(self) -> None:
        for streams in self._streams.values():
            for subscription in streams:
                subscription.wake()

    def _end_all(self, reason: str) -> None:
        for streams in list(self._streams.values()):
            for subscription in list(streams):
                subscription.close(reason)

    # Listening ------------------------------------------------------------

    async def start(self) -> None:
        """Start listening in the background; streams are accepted from now on (refused
        only while `state` is `not_receiving`).

        An app may be started by more than one lifespan at once (tests do): the first start
        makes the listener, the last stop ends it.
        """
        self._starts += 1
        self._closed = False
        if self._runner is None or self._runner.done():
            self._state = CONNECTING
            self._runner = asyncio.get_running_loop().create_task(self._listen_forever())

    def close_streams_threadsafe(self) -> None:
        """From any thread (a signal handler, a timer): end every stream with a final
        `server_shutdown` event and accept no new one; the listener stays until `stop`."""
        runner = self._runner
        if runner is not None and not runner.done():
            runner.get_loop().call_soon_threadsafe(self._close_streams)

    def _close_streams(self) -> None:
        self._closed = True
        self._end_all("server_shutdown")

    async def stop(self) -> None:
        """Close every stream (they end with a final event) and the listening connection."""
        self._starts -= 1
        if self._starts > 0:
            return
        self._close_streams()
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if runner.get_loop() is asyncio.get_running_loop():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        else:
            runner.get_loop().call_soon_threadsafe(runner.cancel)

    def _open(self) -> Any:
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            connection.close()
            raise
        return connection

    async def _listen_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_FIRST
        deaf_delay = DEAF_RETRY_FIRST
        while True:
            try:
                connection = await asyncio.to_thread(self._open)
            except Exception as exc:
                log.warning(
                    "feed listener cannot connect; retrying",
                    extra={
                        "error_type": type(exc).__name__,
                        "reason": failure_reason(exc),
                        "retry_in_seconds": delay,
                    },
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            fd = connection.fileno()
            self._lost = lost = loop.create_future()
            pause = 0.0
            try:
                loop.add_reader(fd, self._readable, connection)
                self.listening = True
                self.connections_made += 1
                heard = await self._verify(lost, delay)
                if heard is None:
                    # Lost while verifying (reconnect now), or the probe could not be sent.
                    if not lost.done():
                        pause, delay = delay, min(delay * 2, _BACKOFF_MAX)
                elif not heard:
                    pause, deaf_delay = deaf_delay, min(deaf_delay * 2, DEAF_RETRY_MAX)
                    self._not_receiving(pause)
                else:
                    delay, deaf_delay = _BACKOFF_FIRST, DEAF_RETRY_FIRST
                    if self._state == NOT_RECEIVING:
                        log.info("feed listener receives notifications again")
                    self._state = OK
                    self._deaf_logged_at = None
                    # Whatever committed while nobody listened is in the table: catch up.
                    self._wake_all()
                    await lost
                    self._state = CONNECTING
                    log.warning("feed listener lost its connection; reconnecting")
            finally:
                self.listening = False
                loop.remove_reader(fd)
                with contextlib.suppress(Exception):
                    connection.close()
            if pause:
                await asyncio.sleep(pause)

    async def _verify(self, lost: asyncio.Future[None], delay: float) -> bool | None:
        """Whether a probe notified from another connection arrives on the listening one
        within PROBE_TIMEOUT_SECONDS; None if the connection was lost meanwhile or the probe
        could not be sent.

        Not from the listening connection itself: through a transaction pooler, its own
        NOTIFY may run on the very server connection that ran LISTEN, and be delivered
        while the two are linked for that one transaction.
        """
        payload = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        heard: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probe = (payload, heard)
        try:
            try:
                await asyncio.to_thread(self._send_probe, CHANNEL, payload)
            except Exception as exc:
                log.warning(
                    "feed listener cannot send its probe notification; retrying",
                    extra={
                        "error_type": type(exc).__name__,
                        "reason": failure_reason(exc),
                        "retry_in_seconds": delay,
                    },
                )
                return None
            await asyncio.wait(
                {heard, lost}, timeout=PROBE_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if heard.done():
                return True
            return None if lost.done() else False
        finally:
            self._probe = None

    def _not_receiving(self, retry_in: float) -> None:
        self._state = NOT_RECEIVING
        self.probes_missed += 1
        # Told, rather than left waiting on a stream that would only ever send heartbeats:
        # they reconnect (503 here until a listener is verified, or another instance).
        self._end_all(FEED_UNAVAILABLE)
        now = time.monotonic()
        if self._deaf_logged_at is not None and now - self._deaf_logged_at < (
            DEAF_LOG_EVERY_SECONDS
        ):
            log.debug("feed listener still receives no notifications; retrying")
            return
        self._deaf_logged_at = now
        log.error(
            "The change feed's listening connection receives no notifications: a probe "
            "notified on channel %s from another connection did not arrive within %g s. "
            "Most likely the listener goes through a transaction pooler (PgBouncer, Neon's "
            "-pooler host), which does not relay LISTEN: set FEED_DATABASE_URL to the direct "
            "(non-pooler) host. Until then new feed streams get 503 and open ones are ended.",
            CHANNEL,
            PROBE_TIMEOUT_SECONDS,
            extra={"retry_in_seconds": retry_in},
        )

    def _readable(self, connection: Any) -> None:
        try:
            connection.poll()
        except Exception:
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(None)
            return
        notifies = connection.notifies
        probe = self._probe
        for notification in notifies:
            if probe is not None and notification.payload == probe[0]:
                if not probe[1].done():
                    probe[1].set_result(None)
                continue
            parsed = parse_payload(notification.payload)
            if parsed is None:
                continue  # another worker's probe, or anything else on the channel
            user_id, seq = parsed
            for subscription in self._streams.get(user_id, ()):
                subscription.notify(seq)
        notifies.clear()
