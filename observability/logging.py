"""Logging: one JSON object per line on stdout (or a readable line in development), each
carrying the request id, trace id, span id and user id of the request that wrote it.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

import psycopg2
from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from sqlalchemy.exc import StatementError

from service.settings import Settings
from service.text import first_line

# Extras uvicorn attaches for its own colour formatter.
_SKIPPED_ATTRS = frozenset([*RESERVED_ATTRS, "color_message"])
# Uvicorn's own access lines are replaced by ours (with the route and the request's ids).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")
UVICORN_ACCESS_LOGGER = "uvicorn.access"
# Libraries whose DEBUG lines quote what users wrote, kept at INFO whatever LOG_LEVEL says:
# sse_starlette logs each chunk a change feed stream sends, every event's task title,
# description and tags.
QUOTING_LOGGERS = ("sse_starlette",)

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


# Database errors: what they say past their first line is user data ---------------------------


def is_database_error(exc: BaseException) -> bool:
    """A driver's error, or SQLAlchemy's around one (whose text quotes the driver's)."""
    return isinstance(exc, (psycopg2.Error, StatementError))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the members of exception groups."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)


def holds_database_error(exc: BaseException) -> bool:
    return any(is_database_error(e) for e in _chain(exc))


def failure_reason(exc: BaseException) -> str:
    """A log line's `reason`: the first line of what failed, the driver's for a database error
    (`connection to server ... failed: Connection refused`, `permission denied for table
    tasks`), without the statement SQLAlchemy adds or the values PostgreSQL's later lines
    quote. Background work that retries each interval says why, not only `error_type`."""
    orig = exc.orig if isinstance(exc, StatementError) else None
    return first_line(orig if orig is not None else exc)


def format_exception(exc: BaseException) -> str:
    """The traceback as `traceback.format_exception` writes it (chained exceptions
    included), each database error in it reduced to its first line."""
    formatted = traceback.TracebackException.from_exception(exc, compact=True)
    if holds_database_error(exc) and not _shorten_database_errors(formatted, exc):
        # A Python whose TracebackException works otherwise: the outermost frames and
        # the exception's type and first line, nothing that could quote a value.
        stack = "".join(traceback.format_tb(exc.__traceback__))
        summary = f"{type(exc).__module__}.{type(exc).__qualname__}: {first_line(exc)}"
        return f"Traceback (most recent call last):\n{stack}{summary}"
    return "".join(formatted.format()).rstrip("\n")


def _shorten_database_errors(formatted: traceback.TracebackException, exc: BaseException) -> bool:
    """Walk the formatted chain beside the exceptions it was made from; False if this
    Python's TracebackException keeps the message elsewhere than in `_str`."""
    seen: set[int] = set()
    pending: list[tuple[traceback.TracebackException, BaseException]] = [(formatted, exc)]
    while pending:
        node, current = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if is_database_error(current):
            if not isinstance(getattr(node, "_str", None), str):
                return False
            node._str = first_line(current)  # type: ignore[attr-defined]
        for attr in ("__cause__", "__context__"):
            child, child_exc = getattr(node, attr), getattr(current, attr)
            if child is not None and child_exc is not None:
                pending.append((child, child_exc))
        members = getattr(node, "exceptions", None) or []
        if isinstance(current, BaseExceptionGroup):
            pending.extend(zip(members, current.exceptions, strict=False))
    return True


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _format_exc_info(ei: ExcInfo) -> str:
    exc = ei[1]
    return "" if exc is None else format_exception(exc)


class JsonLogFormatter(JsonFormatter):
    """`timestamp` (RFC 3339, UTC), `level`, `logger`, `message`, then the record's extras."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=list(_SKIPPED_ATTRS),
        )

    def formatException(self, ei: ExcInfo) -> str:
        """The traceback, without what a database error says past its first line."""
        return _format_exc_info(ei)

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

    def formatException(self, ei: ExcInfo) -> str:
        """The traceback, without what a database error says past its first line."""
        return _format_exc_info(ei)

    def format(self, record: logging.LogRecord) -> str:
        # Not the text another handler (pytest's, say) formatted and cached on the record.
        record.exc_text = None
        return super().format(record)

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
        for name in QUOTING_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.INFO, root.level))
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
        logging.getLogger("uvicorn.error").addFilter(_answered_filter)  # once: same object
        # What uvicorn itself does for access_log=False: it then skips formatting the lines.
        access = logging.getLogger(UVICORN_ACCESS_LOGGER)
        access.handlers.clear()
        access.propagate = False
