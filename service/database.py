"""Engine, sessions and the one unit of work per request."""

from __future__ import annotations

import logging
import re
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from psycopg2.extensions import STATUS_READY, TRANSACTION_STATUS_IDLE
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from service.settings import ConfigError, Settings, check_database_url
from service.text import first_line

logger = logging.getLogger(__name__)
T = TypeVar("T")


def normalize_database_url(raw: str) -> URL:
    """Accept what Neon and Heroku print (`postgres://`) and pin the psycopg2 driver.

    Query parameters such as `sslmode=require` are kept as they are.
    """
    check_database_url(raw)
    return make_url(raw).set(drivername="postgresql+psycopg2")


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def safe_url(url: URL) -> str:
    """The URL with the password masked, for logs and messages: also one given as a query
    parameter (`?password=`, which libpq accepts)."""
    shown = url.render_as_string(hide_password=True)
    return _QUERY_PASSWORD.sub(r"\1***", shown)


def connect_args(settings: Settings, url: URL | None = None) -> dict[str, Any]:
    """psycopg2 connection options, for the pool's connections and the feed's listener.

    The timeouts are added to the `options` of `url` (`?options=`: Neon's `endpoint=...` for
    a client without SNI, a `search_path`), not put in their place: connect_args wins over
    the URL's query, and dropped them without a word."""
    args: dict[str, Any] = {
        "connect_timeout": settings.db_connect_timeout_seconds,
        "application_name": "todo-api",
        # Dead peers are noticed within seconds instead of the kernel's two hours: idle
        # connections by keepalives, a request's unacknowledged writes by the user timeout.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    given = url.query.get("options") if url is not None else None
    options = list(given) if isinstance(given, tuple) else [given] if given else []
    if settings.db_statement_timeout_ms:
        options.append(f"-c statement_timeout={settings.db_statement_timeout_ms}")
    if settings.db_idle_in_transaction_timeout_ms:
        # A process frozen mid-transaction (a VM paused, a stalled worker) would otherwise hold
        # its row locks, and its users' writes, until keepalives notice, if ever: its kernel
        # still answers them.
        idle = settings.db_idle_in_transaction_timeout_ms
        options.append(f"-c idle_in_transaction_session_timeout={idle}")
    if options:
        args["options"] = " ".join(options)
    return args


# For work that may rightly run longer than a request (migrations, `audit verify`/`export`):
# neither timeout for the current transaction, whoever set it (the startup option above, or
# the role or database behind a pooler). Local to the transaction (set_config's `true`, as
# SET LOCAL), it ends with it, so a pooler's server connection carries none of it to its
# next client (a session-level SET would).
UNTIMED_TRANSACTION = (
    "SELECT set_config('statement_timeout', '0', true), "
    "set_config('idle_in_transaction_session_timeout', '0', true)"
)


# undefined_table, undefined_column: the schema is older than the code.
_NOT_MIGRATED = frozenset({"42P01", "42703"})
# query_canceled: at DB_STATEMENT_TIMEOUT_MS (or an administrator's pg_cancel_backend).
QUERY_CANCELED = "57014"
# libpq's message when the server (or a pooler in front of it) answered the connection with an
# error: "connection to server at ... failed: FATAL:  ..." (no SQLSTATE reaches psycopg2).
_SERVER_REFUSED = re.compile(r"\b(?:FATAL|ERROR|PANIC):")
# PgBouncer (Neon's -pooler endpoint): "unsupported startup parameter: options".
_STARTUP_PARAMETER = re.compile(r"startup parameter|\boptions\b", re.IGNORECASE)
POOLER_HINT = (
    "behind a transaction pooler (Neon's -pooler host, PgBouncer) set DB_STATEMENT_TIMEOUT_MS=0 "
    "and DB_IDLE_IN_TRANSACTION_TIMEOUT_MS=0, take `options` out of DATABASE_URL if it has "
    "them, and set the timeouts on the role instead (ALTER ROLE ... SET statement_timeout = "
    "'10s', and idle_in_transaction_session_timeout)"
)


def refused_connection(exc: DBAPIError) -> bool:
    """The server answered the connection with an error (a setting it refuses, a wrong
    password, a database that does not exist), as opposed to not answering at all."""
    return getattr(exc.orig, "pgcode", None) is None and bool(_SERVER_REFUSED.search(str(exc.orig)))


# Refusals no wait will cure: a wrong database, role, password or pg_hba rule.
_REFUSED_FOR_GOOD = re.compile(
    r"does not exist|password authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects"
    r"|permission denied for database|fe_sendauth: no password supplied"
)


def refused_for_good(exc: DBAPIError) -> bool:
    """The connection was refused for a reason in the settings (DATABASE_URL, the role),
    as opposed to a server starting up or out of connections, which waiting cures."""
    return getattr(exc.orig, "pgcode", None) is None and bool(
        _REFUSED_FOR_GOOD.search(first_line(exc.orig))
    )


def refused_startup_parameter(exc: DBAPIError) -> bool:
    """The server (a pooler) refused the connection's startup options: a setting to change,
    not a database still starting or out of connections."""
    if not refused_connection(exc):
        return False
    return bool(_STARTUP_PARAMETER.search(first_line(exc.orig)))


# Where a cancelling statement_timeout comes from: this service's startup option, or, behind
# a transaction pooler (which refuses it), the role's or the database's own setting.
_TIMEOUT_SOURCES = "DB_STATEMENT_TIMEOUT_MS, or the statement_timeout set on the role or database"


def failure_message(exc: DBAPIError) -> str:
    """For the command line: a server that could not be reached, one that refused the
    connection, or one that answered with an error (a statement cancelled at
    DB_STATEMENT_TIMEOUT_MS, a lock wait, a schema never migrated): not the same fix.
    Only the driver's first line is said: the rest is PostgreSQL's DETAIL, HINT and CONTEXT,
    which quote values (`Key (id)=(1) already exists`), and the statement."""
    reason = first_line(exc.orig)
    code = getattr(exc.orig, "pgcode", None)
    if refused_connection(exc) or refused_for_good(exc):
        if refused_startup_parameter(exc):
            return f"the database refused the connection: {reason}; {POOLER_HINT}"
        return f"the database refused the connection: {reason}"
    if code is None:
        return f"the database is unreachable: {reason}"
    if code == QUERY_CANCELED:
        return f"the database cancelled a statement: {reason} ({_TIMEOUT_SOURCES})"
    if code in _NOT_MIGRATED:
        return f"the database is not migrated ({reason}): run `todo-api migrate`"
    return f"the database failed the command ({code}): {reason}"


def build_engine(settings: Settings, url: str | None = None) -> Engine:
    raw = url or settings.database_url
    if raw is None:
        raise ConfigError("DATABASE_URL is not set")
    db_url = normalize_database_url(raw)
    engine = create_engine(
        db_url,
        connect_args=connect_args(settings, db_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        # Neon closes idle connections; never hand out one older than this.
        pool_recycle=settings.db_pool_recycle_seconds,
        # No pre-ping round trip: see `_closed_by_server` and `sent_nothing`.
        pool_pre_ping=False,
        # Error messages and logs never carry statement parameters (task text, user data).
        hide_parameters=True,
    )
    event.listen(engine, "checkout", _closed_by_server)
    event.listen(engine, "checkin", _default_isolation)
    event.listen(engine, "handle_error", _mark_sent_nothing)
    return engine


def _closed_by_server(
    dbapi_connection: Any, _record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
) -> None:
    """A pooled connection the server has closed is replaced before it is lent, for the cost
    of a system call instead of a `SELECT 1` round trip.

    An idle connection has nothing to read: readable means the server said goodbye (a
    terminated backend, `idle_session_timeout`, a restart: its FATAL message or the end of
    the stream). The pool then opens a new connection in its place. A peer that vanished
    without a word is caught by `sent_nothing` instead.
    """
    if dbapi_connection.closed:
        raise DisconnectionError("the connection is closed")
    # Known locally (libpq), no round trip. A cancel or statement timeout that lands on
    # psycopg2's own BEGIN leaves the server in an aborted transaction while psycopg2 thinks
    # none is open, so its rollback() sends nothing: such a connection would fail every
    # statement of every request it is lent to.
    if dbapi_connection.info.transaction_status != TRANSACTION_STATUS_IDLE:
        raise DisconnectionError("the connection was left inside a transaction")
    # poll, not select: a worker holding thousands of change-feed streams has descriptors
    # past select()'s limit of 1024.
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("the server closed the idle connection")


def _default_isolation(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    """A read unit's connection comes back from autocommit set to READ COMMITTED by name,
    which psycopg2 then spells out in every BEGIN: back to the server's default, a plain
    BEGIN (the same level). Client-side, no round trip."""
    if (
        dbapi_connection is not None
        and not dbapi_connection.closed
        and dbapi_connection.isolation_level is not None
        and dbapi_connection.info.transaction_status == TRANSACTION_STATUS_IDLE
    ):
        dbapi_connection.isolation_level = None


_SENT_NOTHING = "todo_api_sent_nothing"


def _mark_sent_nothing(context: ExceptionContext) -> None:
    """Mark a statement that failed on a dead connection before it was sent.

    psycopg2 opens a transaction by sending BEGIN on its own, and sends the statement only
    once BEGIN succeeded; while BEGIN has not, the connection's status stays READY. So a
    disconnect with the status still READY means nothing of this transaction reached the
    server. Not in autocommit mode, where statements go without a BEGIN.
    """
    exc = context.sqlalchemy_exception
    if exc is None or not context.is_disconnect or context.statement is None:
        return
    execution = context.execution_context
    if execution is None:
        # Failed while making its cursor: nothing was sent.
        setattr(exc, _SENT_NOTHING, True)
        return
    connection = execution.cursor.connection
    if not connection.autocommit and connection.status == STATUS_READY:
        setattr(exc, _SENT_NOTHING, True)


def sent_nothing(exc: BaseException) -> bool:
    """The error is a statement's that failed on a dead connection before anything of its
    transaction was sent: the work may be redone, once, on a fresh connection."""
    return bool(getattr(exc, _SENT_NOTHING, False))


def retried_once(work: Callable[[], T]) -> T:
    """`work`, a transaction of its own outside a request's unit of work; again, once, on a
    fresh connection if its pooled one was dead before anything was sent (as endpoints are
    retried by `service.deps`)."""
    try:
        return work()
    except DBAPIError as exc:
        if not sent_nothing(exc):
            raise
        logger.warning("database connection lost before use; retrying on a new one")
        return work()


_COMMIT_UNANSWERED = "todo_api_commit_unanswered"


def mark_commit_unanswered(exc: BaseException) -> None:
    """Mark the error of a request's write unit whose commit lost its connection: COMMIT may
    have reached the server and committed, with only its answer lost."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        setattr(exc, _COMMIT_UNANSWERED, True)


def commit_unanswered(exc: BaseException) -> bool:
    """Whether the change was saved is unknown (`mark_commit_unanswered`): unlike a failure of
    any earlier statement, this one does not mean that the unit was rolled back."""
    return bool(getattr(exc, _COMMIT_UNANSWERED, False))


_ON_COMMIT = "on_commit"
# In `session.info` of a `Database.read_unit`.
READ_ONLY = "read_only"


def on_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_ON_COMMIT, []).append(callback)


def _run_on_commit(session: Session) -> None:
    for callback in session.info.pop(_ON_COMMIT, []):
        callback()


def _drop_on_commit(session: Session, *_: Any) -> None:
    session.info.pop(_ON_COMMIT, None)


class Database:
    """The engine and its session factory; one per process (or per test run)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
        event.listen(self.sessionmaker, "after_commit", _run_on_commit)
        event.listen(self.sessionmaker, "after_soft_rollback", _drop_on_commit)
        # The same pool, each connection lent in autocommit (psycopg2's, set without a round
        # trip) and given back as it was.
        self.read_sessionmaker = sessionmaker(
            bind=engine.execution_options(isolation_level="AUTOCOMMIT"),
            expire_on_commit=False,
            autoflush=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(build_engine(settings))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """Commit once at the end, roll back on any error; services only flush."""
        with self.sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def read_unit(self) -> Iterator[Session]:
        """A unit of reads: each statement in a transaction of its own (autocommit), so no
        `BEGIN` and no `COMMIT` round trips. For work whose one statement, or whose
        statements each alone, answer the request: nothing here may write, and statements
        do not share a snapshot."""
        with self.read_sessionmaker() as session:
            session.info[READ_ONLY] = True
            yield session

    def dedicated_connection(
        self, settings: Settings, application_name: str, *, feed: bool = True
    ) -> Any:
        """A psycopg2 connection of its own, outside the pool (and untraced), in autocommit:
        for a long-lived LISTEN. To FEED_DATABASE_URL if set (a pooler does not relay LISTEN)
        and `feed`, else to the pool's database."""
        url = self.engine.url
        if feed and settings.feed_database_url is not None:
            url = normalize_database_url(settings.feed_database_url)
        _, params = self.engine.dialect.create_connect_args(url)
        # No statement timeout on a connection that only waits (the URL's options stay).
        untimed = settings.model_copy(
            update={"db_statement_timeout_ms": 0, "db_idle_in_transaction_timeout_ms": 0}
        )
        options = {**params, **connect_args(untimed, url), "application_name": application_name}
        connection = self.engine.dialect.loaded_dbapi.connect(**options)
        connection.autocommit = True
        return connection

    def notify(self, settings: Settings, channel: str, payload: str) -> None:
        """NOTIFY from a short connection of its own to the pool's database (where the
        writers' notifications come from), outside the pool: the change feed's probe."""
        connection = self.dedicated_connection(settings, "todo-api-feed-probe", feed=False)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        finally:
            connection.close()

    def dispose(self) -> None:
        self.engine.dispose()
