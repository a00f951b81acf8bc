"""Logging: one JSON object per line on stdout (or a readable line in development), each
carrying the request id, trace id, span id and user id of the request that wrote it.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from service.settings import Settings

# Extras uvicorn attaches for its own colour formatter.
_SKIPPED_ATTRS = frozenset([*RESERVED_ATTRS, "color_message"])
# Uvicorn's own access lines are replaced by ours (with the route and the request's ids).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")
UVICORN_ACCESS_LOGGER = "uvicorn.access"

# The request's ASGI `state` dict: RequestIdMiddleware puts `request_id` in it and
# authentication `user_id`, so log lines read them as soon as they are known.
_request_state: ContextVar[dict[str, Any] | None] = ContextVar("request_state", default=None)

_lock = threading.Lock()
_handler: logging.Handler | None = None


def bind_request_state(state: dict[str, Any]) -> Token[dict[str, Any] | None]:
    return _request_state.set(state)


def unbind_request_state(token: Token[dict[str, Any] | None]) -> None:
    _request_state.reset(token)


class RequestContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` (the current span's, hex), `request_id` and `user_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        state = _request_state.get()
        if state is not None:
            for key in ("request_id", "user_id"):
                value = state.get(key)
                if value is not None and not hasattr(record, key):
                    setattr(record, key, value)
        return True


# Set on an exception the app has already answered and logged (a request cancelled at the
# shutdown timeout): re-raised so the cancellation propagates, it is no unhandled error.
_ANSWERED = "todo_api_answered"


def mark_answered(exc: BaseException) -> None:
    setattr(exc, _ANSWERED, True)


class AnsweredExceptionFilter(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" error (with its traceback) for an
    exception marked by `mark_answered`: the client got its answer, a warning said why."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and getattr(exc, _ANSWERED, False))


_answered_filter = AnsweredExceptionFilter()


class JsonLogFormatter(JsonFormatter):
    """`timestamp` (RFC 3339, UTC), `level`, `logger`, `message`, then the record's extras."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=list(_SKIPPED_ATTRS),
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        created = datetime.fromtimestamp(record.created, tz=UTC)
        log_data["timestamp"] = created.isoformat(timespec="microseconds").replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)


class ConsoleLogFormatter(logging.Formatter):
    """For people: time, level, logger and message, then the extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _SKIPPED_ATTRS and not key.startswith("_")
        )
        return f"{line}  {extras}" if extras else line


class StdoutHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stdout` is at the time, like `logging.lastResort` does for
    stderr (a test harness replaces it; a stream bound at start-up would be closed by then)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(settings: Settings, *, exclusive: bool = False) -> None:
    """Send every log line, uvicorn's included, through one formatter on stdout.

    Idempotent: the app factory calls it in every worker (and every test app). `exclusive`
    also removes the root logger's other handlers (the CLI's, after Alembic added its own).
    """
    global _handler
    formatter: logging.Formatter
    if settings.effective_log_format == "json":
        formatter = JsonLogFormatter()
    else:
        formatter = ConsoleLogFormatter()
    root = logging.getLogger()
    with _lock:
        if _handler is None:
            _handler = StdoutHandler()
            _handler.addFilter(RequestContextFilter())
        _handler.setFormatter(formatter)
        if exclusive:
            for handler in list(root.handlers):
                if handler is not _handler:
                    root.removeHandler(handler)
        if _handler not in root.handlers:
            root.addHandler(_handler)
        root.setLevel(settings.log_level.upper())
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
        logging.getLogger("uvicorn.error").addFilter(_answered_filter)  # once: same object
        # What uvicorn itself does for access_log=False: it then skips formatting the lines.
        access = logging.getLogger(UVICORN_ACCESS_LOGGER)
        access.handlers.clear()
        access.propagate = False
