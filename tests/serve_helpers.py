"""`todo-api serve` as a real process on a free port, the way a container or a developer runs it."""

from __future__ import annotations

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

    def __init__(self, cwd: Path, env: dict[str, str], *, workers: int = 1, name: str = "api"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.env = env
        self.workers = workers
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
            )
        return self

    def wait_ready(self, timeout: float = 60) -> ServeProcess:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

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
            self.process.kill()
            self.process.wait()
            raise
