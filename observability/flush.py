"""At shutdown: export what the trace and metric providers still hold, for a bounded time.

The SDK gives no bound of its own: the batch span processor's flush ignores its timeout, and
the OTLP exporters ignore the one they are given, waiting instead for `OTEL_EXPORTER_OTLP_TIMEOUT`
(10 s by default, retries included) per export. With the collector down or hung, flushing
spans and then metrics cost up to twice that on every stop. Here both flushes run at once, each
in a daemon thread, and are waited for until the budget (SHUTDOWN_FLUSH_SECONDS) is spent; a
flush still waiting then is abandoned, and its thread ends with the process. Daemon threads,
not an executor: the process waits at exit for an executor's threads, hung or not.

The providers this service builds are made with `shutdown_on_exit=False` for the same reason:
the SDK's exit handler would otherwise flush again, without a bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("observability.flush")


def flush_telemetry(tracer_provider: Any, meter_provider: Any, timeout_seconds: float) -> list[str]:
    """Flush both providers (either may be None) concurrently, waiting at most
    `timeout_seconds`; the signals ("traces", "metrics") not flushed by then. With 0, nothing
    is flushed (the operator's choice: what is held is dropped, without a warning)."""
    if timeout_seconds <= 0:
        return []
    deadline = time.monotonic() + timeout_seconds
    timeout_millis = round(timeout_seconds * 1000)
    flushing: dict[str, threading.Thread] = {}
    for signal, provider in (("traces", tracer_provider), ("metrics", meter_provider)):
        flush = getattr(provider, "force_flush", None)
        if not callable(flush):
            continue
        thread = threading.Thread(
            target=_flush,
            args=(signal, flush, timeout_millis),
            name=f"flush-{signal}",
            daemon=True,
        )
        thread.start()
        flushing[signal] = thread
    for thread in flushing.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    late = [signal for signal, thread in flushing.items() if thread.is_alive()]
    if late:
        log.warning(
            "telemetry not exported within SHUTDOWN_FLUSH_SECONDS: is the collector down? "
            "What was left is dropped",
            extra={"signals": late, "flush_seconds": timeout_seconds},
        )
    return late


def _flush(signal: str, flush: Callable[..., Any], timeout_millis: int) -> None:
    try:
        flush(timeout_millis=timeout_millis)
    except Exception:  # the MeterProvider raises for a reader that failed
        log.warning("flushing %s at shutdown failed", signal, exc_info=True)
