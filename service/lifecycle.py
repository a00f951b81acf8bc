"""Graceful shutdown on SIGTERM: drain (readiness fails, requests still served), then stop.

Uvicorn handles SIGTERM by closing its listener, giving in-flight requests
`timeout_graceful_shutdown` to finish, and then running the app's shutdown (which flushes spans
and closes the pool). A load balancer that still sends to the instance in the meantime gets
refused connections, so before that, for `SHUTDOWN_DRAIN_SECONDS`, the instance keeps serving
but answers `/readyz` with 503, and the balancer takes it out of rotation.

The drain wraps uvicorn's own signal handler from inside the app's start-up (each worker
process runs its own), so it works for `serve --workers N` too.

A SIGTERM that comes while draining, or after, is the same stop and is ignored: it never cuts
the drain short. With `--workers N`, a SIGTERM to the whole process group (systemd's
KillMode=control-group, `kill -TERM -PGID`) reaches each worker twice, directly and from
uvicorn's supervisor as it stops its workers half a second later, and taking the second as
"stop now" skipped the drain. (Uvicorn, too, stops at once only on a second SIGINT; SIGINT is
not wrapped, and stops without a drain; SIGKILL is the hard stop.)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("service.lifecycle")

# The process's SIGTERM, as `Drain.install`'s handler receives it (one per process, where a
# `Drain` is one per app): from then on the HTTP protocol (service.httpserver) closes each
# connection after its response, so that kept-alive clients (a load balancer's pooled
# connections) reconnect elsewhere during the drain instead of racing the close of an idle
# connection at its end. `at_sigterm` callbacks run in the handler: the protocol's marks the
# requests already in flight.
_SIGTERM_RECEIVED = threading.Event()
_AT_SIGTERM: list[Callable[[], None]] = []


def sigterm_received() -> bool:
    return _SIGTERM_RECEIVED.is_set()


def at_sigterm(callback: Callable[[], None]) -> None:
    _AT_SIGTERM.append(callback)


def _sigterm() -> None:
    if _SIGTERM_RECEIVED.is_set():
        return  # a repeated SIGTERM (see `Drain.begin`): done at the first
    _SIGTERM_RECEIVED.set()
    for callback in _AT_SIGTERM:
        try:
            callback()
        except Exception:
            log.exception("SIGTERM callback failed")


SignalHandler = Callable[[int, FrameType | None], Any]


class Drain:
    """One per app: `draining` turns true when SIGTERM arrives."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._event = threading.Event()
        # Taken by the first `begin`, never released: a test-and-set in one step, which a
        # SIGTERM handler interrupted by another cannot split.
        self._begun = threading.Lock()
        self._timer: threading.Timer | None = None
        self._on_stop: list[Callable[[], None]] = []

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the drain ends, just before the server stops (from the signal
        handler or the drain's timer thread): long-lived streams end then, not at the timeout."""
        self._on_stop.append(callback)

    def _stop(self, then: Callable[[], None]) -> None:
        for callback in self._on_stop:
            try:
                callback()
            except Exception:
                log.exception("shutdown callback failed")
        then()

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def begin(self, then: Callable[[], None]) -> None:
        """Start draining; call `then` (which stops the server) after the drain period. Once:
        called again (a repeated SIGTERM), it changes nothing, so `then` and the `on_stop`
        callbacks run once, at the drain's end."""
        if not self._begun.acquire(blocking=False):
            log.info("SIGTERM again: ignored, the stop under way (drain first) goes on")
            return
        self._event.set()
        log.info("draining before shutdown", extra={"drain_seconds": self.seconds})
        if self.seconds <= 0:
            self._stop(then)
            return
        self._timer = threading.Timer(self.seconds, self._stop, args=(then,))
        self._timer.daemon = True
        self._timer.start()

    def install(self) -> bool:
        """Wrap the server's SIGTERM handler (uvicorn's), if this is the main thread and one is
        installed. Returns whether it did; an app served any other way keeps its handlers."""
        if threading.current_thread() is not threading.main_thread():
            return False
        server_handler = signal.getsignal(signal.SIGTERM)
        if not callable(server_handler):
            return False
        handler: SignalHandler = server_handler

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            _sigterm()
            self.begin(lambda: handler(signum, frame))

        signal.signal(signal.SIGTERM, on_sigterm)
        return True
