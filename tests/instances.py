"""`todo-api serve` as real processes on free ports, for multi-instance tests (no tests here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import TEST_SECRET, free_port

TODO_API = Path(sys.executable).parent / "todo-api"


class Instance:
    """One `todo-api serve --no-migrate` process; its output goes to a temporary file."""

    def __init__(self, database_url: str, **env: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="todo-api-", suffix=".log")  # noqa: SIM115
        environment = {
            **os.environ,
            "APP_ENV": "test",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "LOG_FORMAT": "json",
            **{key.upper(): str(value) for key, value in env.items()},
        }
        self.process = subprocess.Popen(
            [str(TODO_API), "serve", "--no-migrate", "--port", str(self.port)],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /readyz is 200 and reports the change feed's listener verified (before,
        streams are refused with 503)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"todo-api serve exited:\n{self.output()}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200 and ready.json().get("feed") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"todo-api serve did not become ready:\n{self.output()}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def output(self) -> str:
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops a container; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
