"""One LISTEN connection per worker process, waking that worker's feed streams.

A trigger on `audit_events` notifies channel `audit_events` with `seq:user_id` when the
writing transaction commits. The hub reads those notifications on a dedicated psycopg2
connection watched by the event loop (`loop.add_reader`: no thread, no polling) and wakes the
streams of that user. A notification carries no content: a woken stream reads what it has not
sent yet from the table (`seq > last sent`), so a lost notification can delay an event but
never lose or repeat one. When the connection drops, the hub reconnects with backoff and wakes
every stream, which then catches up from the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from service.exceptions import DomainError
from service.problem_types import ProblemType

log = logging.getLogger("service.events")

CHANNEL = "audit_events"
RETRY_AFTER_SECONDS = "10"
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 10.0


class TooManyStreams(DomainError):
    kind = ProblemType.rate_limited
    headers = {"Retry-After": RETRY_AFTER_SECONDS}  # noqa: RUF012 (read-only)


class FeedUnavailable(DomainError):
    kind = ProblemType.unavailable
    headers = {"Retry-After": RETRY_AFTER_SECONDS}  # noqa: RUF012 (read-only)


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
        max_streams_per_user: int,
        max_streams_per_worker: int,
    ) -> None:
        self._connect = connect
        self.max_streams_per_user = max_streams_per_user
        self.max_streams_per_worker = max_streams_per_worker
        self._streams: dict[str, set[Subscription]] = {}
        self._count = 0
        self._closed = False
        self._starts = 0
        self._runner: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self.listening = False
        self.connections_made = 0

    # Streams --------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return self._count

    def subscribe(self, user_id: str, last_seq: int) -> Subscription:
        if self._closed or self._runner is None:
            raise FeedUnavailable("The change feed is not running on this server.")
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

    # Listening ------------------------------------------------------------

    async def start(self) -> None:
        """Start listening in the background; streams are accepted from now on.

        An app may be started by more than one lifespan at once (tests do): the first start
        makes the listener, the last stop ends it.
        """
        self._starts += 1
        self._closed = False
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._listen_forever())

    def close_streams_threadsafe(self) -> None:
        """From any thread (a signal handler, a timer): end every stream with a final
        `server_shutdown` event and accept no new one; the listener stays until `stop`."""
        runner = self._runner
        if runner is not None and not runner.done():
            runner.get_loop().call_soon_threadsafe(self._close_streams)

    def _close_streams(self) -> None:
        self._closed = True
        for streams in list(self._streams.values()):
            for subscription in list(streams):
                subscription.close("server_shutdown")

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
        while True:
            try:
                connection = await asyncio.to_thread(self._open)
            except Exception as exc:
                log.warning(
                    "feed listener cannot connect; retrying",
                    extra={"error_type": type(exc).__name__, "retry_in_seconds": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            delay = _BACKOFF_FIRST
            fd = connection.fileno()
            self._lost = loop.create_future()
            try:
                loop.add_reader(fd, self._readable, connection)
                self.listening = True
                self.connections_made += 1
                # Whatever committed while nobody listened is in the table: catch up.
                self._wake_all()
                await self._lost
                log.warning("feed listener lost its connection; reconnecting")
            finally:
                self.listening = False
                loop.remove_reader(fd)
                with contextlib.suppress(Exception):
                    connection.close()

    def _readable(self, connection: Any) -> None:
        try:
            connection.poll()
        except Exception:
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(None)
            return
        notifies = connection.notifies
        for notification in notifies:
            parsed = parse_payload(notification.payload)
            if parsed is None:
                continue
            user_id, seq = parsed
            for subscription in self._streams.get(user_id, ()):
                subscription.notify(seq)
        notifies.clear()
