"""The embedded PostgreSQL server: `todo-api serve` without DATABASE_URL, restarts, crashes.

Each test has a data directory of its own (a fresh `initdb`), apart from the suite's server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from service.embedded import EmbeddedPostgres
from tests.support import clean_environ, free_port

REPO = Path(__file__).resolve().parent.parent
TODO_API = Path(sys.executable).parent / "todo-api"
# What would make the command use another database or another configuration.


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Every PostgreSQL process (postmaster or backend) still running on `data_dir`: they all
    work in the data directory."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "cwd"]):
        if process.info["name"] != "postgres":
            continue
        if process.info["cwd"] == str(data_dir) or str(data_dir) in (process.info["cmdline"] or []):
            found.append(process)
    return found


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    """A bounded wait for a state (not a timed assertion)."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def count_rows(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM kept")).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A working directory of its own. Not under pytest's tmp_path: run as root, PostgreSQL runs
    as another user, and each pytest run makes the base of tmp_path private to root again."""
    path = Path(tempfile.mkdtemp(prefix="todo-api-embedded-"))
    yield path
    for process in postgres_processes(path / ".todo-api-pg" / "data"):  # after a failed test
        process.kill()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(workdir: Path) -> Path:
    return workdir / ".todo-api-pg"


# The server's life -----------------------------------------------------------------------


def test_released_by_its_last_holder_the_server_stops_and_its_data_stays(home: Path) -> None:
    server = EmbeddedPostgres(home)
    server.acquire()
    url = server.ensure_database("app")
    assert sa.make_url(url).query["host"].startswith(str(home))  # a Unix socket, no TCP port
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (id int)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (1), (2)"))
    engine.dispose()
    pid = server.postmaster_pid()
    assert pid is not None

    assert server.release() is True
    assert not psutil.pid_exists(pid)
    assert postgres_processes(server.data_dir) == []
    assert not (server.data_dir / "postmaster.pid").exists()

    again = EmbeddedPostgres(home)
    again.acquire()
    try:
        assert again.postmaster_pid() not in (None, pid)
        assert count_rows(again.ensure_database("app")) == 2
    finally:
        assert again.release() is True


HOLDER = """
import sys
from pathlib import Path
from service.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]))
print(server.acquire(), flush=True)
sys.stdin.read()
print("stopped" if server.release() else "left running", flush=True)
"""


def holder(home: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("postgresql://")
    return process


def test_the_server_runs_until_the_last_holder_lets_go(home: Path) -> None:
    other = holder(home)
    server = EmbeddedPostgres(home)
    server.acquire()
    pid = server.postmaster_pid()
    assert server.release() is False  # the other process still uses it
    assert server.postmaster_pid() == pid

    out, _ = other.communicate("", timeout=60)
    assert out.strip() == "stopped"
    assert postgres_processes(server.data_dir) == []


def test_a_holder_killed_without_letting_go_does_not_keep_the_server_up(home: Path) -> None:
    crashed = holder(home)
    server = EmbeddedPostgres(home)
    pid = server.postmaster_pid()
    assert pid is not None
    crashed.kill()
    crashed.wait(timeout=30)
    assert server.postmaster_pid() == pid  # the postmaster outlived its holder

    server.acquire()
    assert server.postmaster_pid() == pid  # reused, not started twice
    assert server.release() is True
    assert postgres_processes(server.data_dir) == []


def test_a_postmaster_pid_file_left_by_a_crash_is_recovered(home: Path) -> None:
    server = EmbeddedPostgres(home)
    server.acquire()
    url = server.ensure_database("app")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (id int)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (1)"))
    engine.dispose()
    pid = server.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: postgres_processes(server.data_dir) == [], "the backends to exit")
    server.release()

    pid_file = server.data_dir / "postmaster.pid"
    assert pid_file.exists()  # the crash left it
    # Worse: its pid now belongs to a live process that is not PostgreSQL.
    with subprocess.Popen(["sleep", "60"]) as squatter:
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")

        restarted = EmbeddedPostgres(home)
        restarted.acquire()
        try:
            new_pid = restarted.postmaster_pid()
            assert new_pid not in (None, pid, squatter.pid)
            assert count_rows(restarted.ensure_database("app")) == 1  # recovered from the WAL
        finally:
            assert restarted.release() is True
        assert squatter.poll() is None  # the unrelated process was left alone
        squatter.kill()
    assert postgres_processes(server.data_dir) == []


# `todo-api serve` with no DATABASE_URL --------------------------------------------------


def _environment() -> dict[str, str]:
    return clean_environ(OTEL_SDK_DISABLED="true")


def serve(workdir: Path, port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [str(TODO_API), "serve", "--port", str(port)],
        cwd=workdir,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def healthy() -> bool:
        assert process.poll() is None, process.communicate()[1]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, "the service to start", timeout=120)
    return process


def stop(process: subprocess.Popen[str], signum: int) -> str:
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return err


def test_serve_without_database_url_keeps_tasks_across_a_restart(workdir: Path) -> None:
    data_dir = workdir / ".todo-api-pg" / "data"
    port = free_port()
    token = subprocess.run(
        [str(TODO_API), "dev-token", "alice"],
        cwd=workdir,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    tasks = f"http://127.0.0.1:{port}/api/alice/tasks"

    first = serve(workdir, port)
    try:
        created = httpx.post(tasks, json={"title": "from yesterday"}, headers=headers)
        assert created.status_code == 201
    finally:
        err = stop(first, signal.SIGTERM)
    assert "embedded PostgreSQL server" in err and "Stopped" in err, err
    assert "Traceback" not in err
    assert postgres_processes(data_dir) == []
    assert not (data_dir / "postmaster.pid").exists()

    second = serve(workdir, port)
    try:
        listed = httpx.get(tasks, headers=headers)
        assert listed.status_code == 200
        assert listed.json() == [created.json()]
    finally:
        err = stop(second, signal.SIGINT)
    assert "Stopped" in err and "Traceback" not in err, err
    assert postgres_processes(data_dir) == []


def test_serve_stops_the_server_when_its_terminal_closes(workdir: Path) -> None:
    """Closing the terminal of `make run` sends SIGHUP: the postmaster, in a session of its own,
    would outlive the service."""
    data_dir = workdir / ".todo-api-pg" / "data"
    process = serve(workdir, free_port())
    err = stop(process, signal.SIGHUP)
    assert "Stopped the embedded PostgreSQL server." in err and "Traceback" not in err, err
    assert postgres_processes(data_dir) == []
    assert not (data_dir / "postmaster.pid").exists()


def test_a_stop_during_the_first_start_leaves_a_data_directory_that_starts(workdir: Path) -> None:
    """SIGTERM (or Ctrl-C) while `initdb` runs, the first start's 4 seconds: an `initdb` cut
    short leaves a cluster without its `postgres` database, which no later command can use."""
    data_dir = workdir / ".todo-api-pg" / "data"
    process = subprocess.Popen(
        [str(TODO_API), "serve", "--port", str(free_port())],
        cwd=workdir,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for((data_dir / "PG_VERSION").exists, "initdb to be under way")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert "Stopped the embedded PostgreSQL server." in err and "Traceback" not in err, err
    assert postgres_processes(data_dir) == []

    again = subprocess.run(
        [str(TODO_API), "migrate"],
        cwd=workdir,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert postgres_processes(data_dir) == []


# A server that cannot start -----------------------------------------------------------------


def _cannot_start(workdir: Path) -> subprocess.CompletedProcess[str]:
    """`todo-api audit verify` in `workdir`: its exit 1 would mean "tampering found"."""
    return subprocess.run(
        [str(TODO_API), "audit", "verify"],
        cwd=workdir,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_checkout_path_with_a_space_is_one_line_and_exit_3(workdir: Path) -> None:
    """pg_ctl hands `-k SOCKET_DIR` to a shell, which splits a path at its spaces."""
    checkout = workdir / "my projects" / "todo-api"
    checkout.mkdir(parents=True)
    result = _cannot_start(checkout)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("todo-api: the embedded PostgreSQL server cannot start"), last
    assert "whitespace" in last and "DATABASE_URL" in last, last
    assert postgres_processes(checkout / ".todo-api-pg" / "data") == []


def test_a_data_directory_of_another_major_version_is_one_line_and_exit_3(workdir: Path) -> None:
    data_dir = workdir / ".todo-api-pg" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "PG_VERSION").write_text("16\n")
    result = _cannot_start(workdir)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("todo-api: the embedded PostgreSQL server cannot start"), last
    assert "version 18 but found version 16" in last, last
    assert (data_dir / "PG_VERSION").read_text() == "16\n"  # left as it was
