"""`todo-api serve` as a real process on a free port, the way a container or a developer runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import clean_environ, free_port

TODO_API = Path(sys.executable).parent / "todo-api"


class ServeProcess:
    """One `todo-api serve --no-migrate` process; `stop()` sends SIGTERM and waits."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str],
        *,
        workers: int = 1,
        name: str = "api",
        own_process_group: bool = False,
    ):
        """`own_process_group`: started in a new session, so that `terminate_group()` signals
        it and its workers at once, as systemd (KillMode=control-group) or `kill -TERM -PGID`
        does."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.env = env
        self.workers = workers
        self.own_process_group = own_process_group
        self.log = cwd / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ServeProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServeProcess:
        # None of the parent's app or OpenTelemetry variables: only what the test gives.
        defaults = {"OTEL_SDK_DISABLED": "true", "LOG_FORMAT": "json"}
        environment = clean_environ(**{**defaults, **self.env})
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(TODO_API),
                    "serve",
                    "--no-migrate",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=self.cwd,  # no .env or dev secret file from the working tree
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_process_group,
            )
        return self

    def wait_ready(self, timeout: float = 60) -> ServeProcess:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200 and (
                    self._workers_started()
                ):
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def _workers_started(self) -> bool:
        """Every worker has finished its start-up (uvicorn's INFO line), not only the one that
        answered: one still starting has not yet installed the drain's SIGTERM handler."""
        if self.workers == 1:
            return True  # it answered
        return self.log.read_text().count("Application startup complete.") >= self.workers

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def terminate_group(self) -> None:
        assert self.process is not None and self.own_process_group
        os.killpg(self.process.pid, signal.SIGTERM)  # its own group: the leader's pid

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; kill only if it does not stop in time (then the test fails)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.own_process_group:
                os.killpg(self.process.pid, signal.SIGKILL)  # the workers too
            else:
                self.process.kill()
            self.process.wait()
            raise
