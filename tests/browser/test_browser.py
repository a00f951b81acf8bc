"""The API in a real browser (Debian's chromium, driven by Playwright): Swagger UI and ReDoc
with no network beyond the service, and a page on another origin that uses the README's fetch
wrapper with real EdDSA tokens, the way a Next.js + Better Auth frontend does.

Run with `make frontend-check` (or `.venv/bin/pytest -m browser tests/browser`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from service.problem_types import ProblemType
from tests.browser.chromium import launch
from tests.http_helpers import LocalHttpServer, QuietHandler
from tests.jwt_helpers import SigningKey, better_auth_claims, generate_key, random_id
from tests.support import LiveServer

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixture"
WRAPPER = ROOT / "clients" / "todo-api-fetch.js"


class FrontendOrigin(LocalHttpServer):
    """The frontend's origin, standing in for Next.js + Better Auth: the page and the wrapper,
    `/api/auth/token` (a JWT signed with a real Ed25519 key; the first one handed out has
    already expired) and `/api/auth/jwks`."""

    def __init__(self) -> None:
        self.key = generate_key("EdDSA")
        self.stranger = generate_key("EdDSA")  # a key the JWKS never lists
        self.user_id = random_id()
        self.token_requests = 0  # GET /api/auth/token
        self.jwks_up = True
        self.lock = threading.Lock()
        origin = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path == "/":
                    self.send(200, (FIXTURE / "index.html").read_bytes(), "text/html")
                elif url.path == "/scenario.js":
                    self.send(200, (FIXTURE / "scenario.js").read_bytes(), "text/javascript")
                elif url.path == "/todo-api-fetch.js":
                    self.send(200, WRAPPER.read_bytes(), "text/javascript")
                elif url.path == "/api/auth/token":
                    with origin.lock:
                        origin.token_requests += 1
                        stale = origin.token_requests == 1
                    key = origin.stranger if query.get("key") == ["unknown"] else origin.key
                    body = {"token": origin.issue(key, stale=stale)}
                    self.send(200, json.dumps(body).encode(), "application/json")
                elif url.path == "/api/auth/jwks":
                    if not origin.jwks_up:
                        self.send(500, b"down", "text/plain")
                        return
                    body = {"keys": [origin.key.public_jwk()]}
                    self.send(200, json.dumps(body).encode(), "application/json")
                elif url.path == "/test-control":
                    origin.jwks_up = query.get("jwks") != ["down"]
                    self.send(204, b"", "text/plain")
                else:
                    self.send(404, b"not found", "text/plain")

        super().__init__(Handler)

    def issue(self, key: SigningKey, *, stale: bool = False) -> str:
        # Like Better Auth: iss = aud = the origin, 15 minutes.
        iat = int(time.time()) - (3600 if stale else 0)
        return key.sign(better_auth_claims(self.origin, user_id=self.user_id, iat=iat))


@pytest.fixture(scope="module")
def frontend() -> Iterator[FrontendOrigin]:
    with FrontendOrigin() as origin:
        yield origin


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = launch(playwright)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield new_page
    context.close()
    assert not errors, errors


def offline(page: Page, allowed: str) -> list[str]:
    """Abort every request that does not go to `allowed`; returns the blocked URLs."""
    blocked: list[str] = []

    def handle(route: Route) -> None:
        if route.request.url.startswith(allowed + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    return blocked


def test_swagger_ui_works_offline_and_runs_list_tasks(
    page: Page, api: LiveServer, frontend: FrontendOrigin
) -> None:
    blocked = offline(page, api.url)
    page.goto(api.url + "/docs")
    operation = page.locator("#operations-tasks-listTasks")
    expect(operation).to_be_visible(timeout=20_000)
    assert page.locator(".opblock").count() >= 6

    # Authorize through the UI with a real token from the frontend's Better Auth.
    token = frontend.issue(frontend.key)
    page.locator("button.authorize").first.click()
    # The bearer scheme's form (the change feed's stream ticket is the dialog's other one).
    bearer = page.locator(".modal-ux .auth-container").filter(has_text="HTTPBearer")
    bearer.locator("input").fill(token)
    bearer.locator(".auth-btn-wrapper button.authorize").click()
    bearer.locator(".btn-done").click()

    operation.locator(".opblock-summary").first.click()
    expect(operation.get_by_text("List the user's tasks")).to_be_visible()
    operation.locator(".try-out__btn").click()
    operation.locator('tr[data-param-name="user_id"] input').fill(frontend.user_id)
    operation.locator(".execute").click()
    status = operation.locator(".live-responses-table tr.response .response-col_status").first
    expect(status).to_have_text("200", timeout=20_000)
    assert blocked == [], blocked


def test_redoc_renders_offline(page: Page, api: LiveServer) -> None:
    blocked = offline(page, api.url)
    page.goto(api.url + "/redoc")
    expect(page.get_by_role("heading", name="todo-api").first).to_be_visible(timeout=30_000)
    operation = page.get_by_role("heading", name=re.compile("List the user's tasks"))
    expect(operation.first).to_be_visible()
    assert blocked == [], blocked


def test_a_page_on_another_origin_uses_the_api_with_the_readme_wrapper(
    page: Page, api: LiveServer, frontend: FrontendOrigin
) -> None:
    page.goto(frontend.origin + "/")
    page.wait_for_function("window.scenarioReady === true", timeout=20_000)
    out: dict[str, Any] = page.evaluate(
        "([api, user]) => window.scenario(api, user)", [api.url, frontend.user_id]
    )
    seen = out["seen"]

    # The first token was stale: the wrapper asked for a fresh one once (after the 401) and
    # the retried create went through; the third request is the unknown-key token below.
    assert frontend.token_requests == 3
    create = seen["create"]
    assert create["status"] == 201
    headers = create["headers"]
    assert headers["Location"].startswith(f"{api.url}/api/{frontend.user_id}/tasks/")
    assert headers["ETag"] and headers["X-Request-ID"] and len(headers["X-Trace-Id"]) == 32
    assert out["created"]["title"] == "Buy milk"

    assert seen["replay"]["status"] == 201
    assert seen["replay"]["headers"]["Idempotent-Replayed"] == "true"
    assert out["replayedId"] == out["created"]["id"]

    assert seen["list"]["headers"]["X-Total-Count"] == "2"
    assert 'rel="next"' in seen["list"]["headers"]["Link"]
    assert out["page1"] == ["Bread"] and out["page2"] == ["Buy milk"]
    assert "Link" not in seen["list2"]["headers"]

    assert seen["edit"]["status"] == 200 and out["edited"]["title"] == "Buy oat milk"
    assert seen["edit"]["headers"]["ETag"] != headers["ETag"]
    assert seen["stale"]["status"] == 412
    assert out["staleContentType"].startswith("application/problem+json")
    assert out["stale"]["type"] == ProblemType.precondition_failed.uri

    assert seen["toggle"]["status"] == 200 and out["toggled"]["completed"] is True
    assert seen["delete"]["status"] == 204
    assert seen["gone"]["status"] == 404 and out["gone"]["type"] == ProblemType.not_found.uri

    assert seen["anonymous"]["status"] == 401
    assert out["anonymousContentType"].startswith("application/problem+json")
    assert out["anonymous"]["type"] == ProblemType.token_missing.uri
    assert seen["anonymous"]["headers"]["WWW-Authenticate"].startswith("Bearer")

    assert seen["unavailable"]["status"] == 503
    assert out["unavailable"]["type"] == ProblemType.unavailable.uri
    assert int(seen["unavailable"]["headers"]["Retry-After"]) > 0

    expect(page.locator("#tasks")).to_have_text("Bread, Buy milk")
