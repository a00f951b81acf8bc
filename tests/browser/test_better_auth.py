"""The API against a real Better Auth: the npm package (pinned in clients/package.json), run by
the machine's `node` with its `jwt` plugin (clients/better-auth-server.mjs), once per algorithm
the README says is supported, each with fresh keys and its own API server. Users sign up over
HTTP and the API is called with the JWTs Better Auth issues; then the README's client side
(`createAuthClient` + `jwtClient()` feeding clients/todo-api-fetch.js) runs in Node.

The rest of the suite forges tokens in Better Auth's shape; this is the check that the shape is
right. Run with `make frontend-check` (or `.venv/bin/pytest -m browser tests/browser`), after
`cd clients && npm ci`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.app import create_app
from service.database import Database
from service.problem_types import ProblemType
from service.settings import Settings
from tests.support import LiveServer, bearer, stop_process

pytestmark = pytest.mark.browser

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
SERVER = CLIENTS / "better-auth-server.mjs"
CLIENT_CHECK = CLIENTS / "better-auth-client-check.mjs"
# The README (Configuration, BETTER_AUTH_URL): "EdDSA by default; ES256, ES512, RS256, PS256 too".
ALGORITHMS = ["EdDSA", "ES256", "ES512", "RS256", "PS256"]
PASSWORD = "correct-horse-battery-staple"
START_WAIT = 30.0  # seconds to wait for node to listen: a bound on a wait, never asserted


def node() -> str:
    """The machine's node, with clients/node_modules installed: missing either is a failure."""
    path = shutil.which("node")
    if path is None or not (CLIENTS / "node_modules" / "better-auth").is_dir():
        pytest.fail(
            "these tests run the real Better Auth in Node: install node and npm, then run "
            "`cd clients && npm ci` (make frontend-check does)",
            pytrace=False,
        )
    return path


def node_env(**extra: str) -> dict[str, str]:
    # Only PATH from here: a NODE_ENV=production of the caller's would turn on Better Auth's
    # rate limits, and a BETTER_AUTH_URL would override the server's own address.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


class BetterAuth:
    """clients/better-auth-server.mjs in a node process, on a port the OS chose."""

    def __init__(self, alg: str, log: Path) -> None:
        self.alg = alg
        self.log = log  # node's stderr
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [node(), str(SERVER)],
                cwd=CLIENTS,
                env=node_env(BETTER_AUTH_SECRET=secrets.token_hex(32), ALG=alg, PORT="0"),
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and self.process.poll() is None:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                if line:
                    return str(json.loads(line)["url"])
        self.stop()
        log = self.log.read_text(errors="replace")
        pytest.fail(f"Better Auth ({self.alg}) did not start:\n{log}", pytrace=False)

    def stop(self) -> None:
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class Account:
    """A user signed up in Better Auth: its id, session cookie and the JWTs it got."""

    user_id: str
    email: str
    name: str
    session_token: str  # the better-auth.session_token cookie's value: not a JWT
    token: str  # from GET /api/auth/token
    session_jwt: str  # from the set-auth-jwt header of GET /api/auth/get-session


def sign_up(better_auth: BetterAuth, name: str) -> Account:
    email = f"{name.lower()}-{secrets.token_hex(4)}@example.com"
    # Better Auth checks the Origin of cookie-bearing requests: send the frontend's, as a
    # browser on it would.
    with httpx.Client(base_url=better_auth.url, headers={"Origin": better_auth.url}) as http:
        signed_up = http.post(
            "/api/auth/sign-up/email", json={"email": email, "password": PASSWORD, "name": name}
        )
        assert signed_up.status_code == 200, signed_up.text
        session_token = http.cookies["better-auth.session_token"]
        token = http.get("/api/auth/token")
        assert token.status_code == 200, token.text
        session = http.get("/api/auth/get-session")
        assert session.status_code == 200, session.text
        return Account(
            user_id=signed_up.json()["user"]["id"],
            email=email,
            name=name,
            session_token=session_token,
            token=token.json()["token"],
            session_jwt=session.headers["set-auth-jwt"],
        )


@pytest.fixture(scope="module", params=ALGORITHMS)
def better_auth(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BetterAuth]:
    server = BetterAuth(request.param, tmp_path_factory.mktemp("better-auth") / "stderr.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(
    base_settings: Settings, database: Database, better_auth: BetterAuth
) -> Iterator[LiveServer]:
    """The service under uvicorn, configured as the README says: BETTER_AUTH_URL = the origin."""
    settings = base_settings.model_copy(update={"better_auth_url": better_auth.url})
    with LiveServer(create_app(settings, database)) as server:
        yield server


def test_better_auth_tokens_work_on_every_task_endpoint(
    better_auth: BetterAuth, api: LiveServer, database: Database
) -> None:
    alice = sign_up(better_auth, "Alice")
    header = json.loads(base64.urlsafe_b64decode(alice.token.split(".")[0] + "=="))
    assert header["alg"] == better_auth.alg  # Better Auth signed with a key of that algorithm

    tasks = f"/api/{alice.user_id}/tasks"
    with api.client(headers=bearer(alice.token)) as http:
        created = http.post(tasks, json={"title": "Buy milk"})
        assert created.status_code == 201, created.text
        task = created.json()
        one = f"{tasks}/{task['id']}"

        listed = http.get(tasks)
        assert listed.status_code == 200
        assert [t["id"] for t in listed.json()] == [task["id"]]

        got = http.get(one)
        assert got.status_code == 200 and got.json()["title"] == "Buy milk"

        updated = http.put(
            one, json={"title": "Buy oat milk"}, headers={"If-Match": got.headers["ETag"]}
        )
        assert updated.status_code == 200 and updated.json()["title"] == "Buy oat milk"

        completed = http.patch(f"{one}/complete", json={"completed": True})
        assert completed.status_code == 200 and completed.json()["completed"] is True

        deleted = http.delete(one)
        assert deleted.status_code == 204
        assert http.get(one).status_code == 404

    # The JWT of get-session's set-auth-jwt header is accepted too.
    with api.client(headers=bearer(alice.session_jwt)) as http:
        assert http.get(tasks).status_code == 200

    # The users row took the email and name from the token's claims.
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": alice.user_id}
        ).one()
    assert (row.email, row.name) == (alice.email, "Alice")


def test_another_users_token_is_403_and_the_session_token_is_401(
    better_auth: BetterAuth, api: LiveServer
) -> None:
    alice = sign_up(better_auth, "Alice")
    bob = sign_up(better_auth, "Bob")
    with api.client() as http:
        # Bob's real token is valid, but on Alice's URL.
        own = http.get(f"/api/{bob.user_id}/tasks", headers=bearer(bob.token))
        assert own.status_code == 200
        other = http.get(f"/api/{alice.user_id}/tasks", headers=bearer(bob.token))
        assert other.status_code == 403, other.text

        # Better Auth's session token (the cookie's value) is not a JWT.
        session = http.get(f"/api/{alice.user_id}/tasks", headers=bearer(alice.session_token))
        assert session.status_code == 401, session.text
        assert session.json()["type"] == ProblemType.token_invalid.uri


def test_the_readme_client_side_with_better_auths_own_client(
    better_auth: BetterAuth, api: LiveServer, database: Database
) -> None:
    email = f"client-{secrets.token_hex(4)}@example.com"
    run = subprocess.run(
        [node(), str(CLIENT_CHECK)],
        cwd=CLIENTS,
        env=node_env(
            BETTER_AUTH_URL=better_auth.url, API_URL=api.url, EMAIL=email, PASSWORD=PASSWORD
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])

    assert out["create"]["status"] == 201, out
    task = out["create"]["task"]
    assert task["title"] == "Buy milk"
    assert out["list"]["status"] == 200 and out["list"]["total"] == "1"
    assert [t["id"] for t in out["list"]["body"]] == [task["id"]]
    assert out["tokens"] == 1  # one token for both calls: the wrapper kept it

    # What the script did is in the database, under the user Better Auth created.
    with database.engine.connect() as conn:
        user = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": out["userId"]}
        ).one()
        titles = conn.execute(
            sa.text("SELECT title FROM tasks WHERE user_id = :id"), {"id": out["userId"]}
        ).scalars()
        assert (user.email, user.name) == (email, "Client Check")
        assert list(titles) == ["Buy milk"]

    # And the same user, signed in again from here, sees it through the API.
    with httpx.Client(base_url=better_auth.url, headers={"Origin": better_auth.url}) as auth:
        signed_in = auth.post(
            "/api/auth/sign-in/email", json={"email": email, "password": PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        token = auth.get("/api/auth/token").json()["token"]
    with api.client(headers=bearer(token)) as http:
        listed = http.get(f"/api/{out['userId']}/tasks")
    assert [t["title"] for t in listed.json()] == ["Buy milk"]
