"""The README's change-feed snippet (`subscribe()`: EventSource with a single-use ticket,
resuming with `after=` the last id) as written, in a real browser on another origin: events
arrive in order, each once, and a stream that ends with `token_expired` is followed by a new
ticket and a stream that resumes where the last one stopped.

Run with `make frontend-check` (or `.venv/bin/pytest -m browser tests/browser`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

from tests.browser.chromium import launch
from tests.http_helpers import LocalHttpServer, QuietHandler
from tests.jwt_helpers import better_auth_claims, generate_key, random_id
from tests.support import LiveServer

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixture"
WAIT_MS = 60_000  # generous: a wait for a condition, never a bound that is asserted


def readme_snippet() -> bytes:
    """The README's frontend snippet for the change feed, exactly as the README shows it."""
    readme = (ROOT / "README.md").read_text()
    intro = "A frontend (any framework), with reconnects that resume where the last stream stopped"
    after = readme[readme.index(intro) :]
    match = re.search(r"```js\n(.*?)```", after, re.DOTALL)
    assert match is not None, "the README's change-feed snippet is gone"
    return match.group(1).encode()


class FeedOrigin(LocalHttpServer):
    """The frontend's origin, standing in for Next.js + Better Auth: the page, the README's
    snippet, `/api/auth/token` and `/api/auth/jwks`. Tokens last `ttl` seconds; after `hold()`,
    token requests wait (the page is between two streams) until `release()`."""

    def __init__(self) -> None:
        self.key = generate_key("EdDSA")
        self.user_id = random_id()
        self.ttl = 900
        self.token_requests = 0
        self.held = 0  # token requests waiting for release()
        self.gate = threading.Event()
        self.gate.set()
        self.changed = threading.Condition()
        origin = self
        files = {
            "/": ((FIXTURE / "feed.html").read_bytes(), "text/html"),
            "/feed.js": ((FIXTURE / "feed.js").read_bytes(), "text/javascript"),
            "/subscribe.js": (readme_snippet(), "text/javascript"),
        }

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path in files:
                    self.send(200, *files[path])
                elif path == "/api/auth/token":
                    token = {"token": origin.next_token()}
                    self.send(200, json.dumps(token).encode(), "application/json")
                elif path == "/api/auth/jwks":
                    jwks = {"keys": [origin.key.public_jwk()]}
                    self.send(200, json.dumps(jwks).encode(), "application/json")
                else:
                    self.send(404, b"not found", "text/plain")

        super().__init__(Handler)

    def issue(self, ttl: int = 900) -> str:
        # Like Better Auth: iss = aud = the origin.
        claims = better_auth_claims(self.origin, user_id=self.user_id, ttl=ttl)
        return self.key.sign(claims)

    def next_token(self) -> str:
        with self.changed:
            self.token_requests += 1
            held = not self.gate.is_set()
            self.held += held
            self.changed.notify_all()
        self.gate.wait(timeout=120)
        with self.changed:
            self.held -= held
        return self.issue(self.ttl)

    def hold(self) -> None:
        self.gate.clear()

    def wait_held(self) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.held > 0, timeout=WAIT_MS / 1000)

    def release(self, ttl: int) -> None:
        self.ttl = ttl
        self.gate.set()

    def __exit__(self, *exc: object) -> None:
        self.gate.set()  # no token request left waiting
        super().__exit__(*exc)


@pytest.fixture(scope="module")
def frontend() -> Iterator[FeedOrigin]:
    with FeedOrigin() as origin:
        yield origin


@pytest.fixture
def feed_page() -> Iterator[tuple[Page, list[str]]]:
    """A page, and what its console and uncaught exceptions reported beyond info and debug."""
    with sync_playwright() as playwright:
        browser = launch(playwright)
        new_page = browser.new_context().new_page()
        problems: list[str] = []

        def console(message: ConsoleMessage) -> None:
            if message.type in {"error", "warning", "assert"}:
                problems.append(f"console {message.type}: {message.text}")

        new_page.on("console", console)
        new_page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        yield new_page, problems
        browser.close()


def test_the_readme_feed_snippet_delivers_each_event_once_and_resumes_after_token_expiry(
    feed_page: tuple[Page, list[str]], api: LiveServer, frontend: FeedOrigin
) -> None:
    tab, problems = feed_page
    user = frontend.user_id
    tasks = f"/api/{user}/tasks"
    client = httpx.Client(
        base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {frontend.issue()}"}
    )

    # The page's first token lasts seconds: its stream ends with token_expired at that exp.
    frontend.ttl = 6
    tab.goto(frontend.origin + "/")
    tab.wait_for_function("window.feedReady === true", timeout=WAIT_MS)
    tab.evaluate("([api, user]) => startFeed(api, user)", [api.url, user])
    tab.wait_for_function("feed.streams.length === 1 && feed.streams[0].opened", timeout=WAIT_MS)
    frontend.hold()  # the next token request, the reconnect's, waits for release()

    # Live: through the API from Python while the page's first stream is open.
    milk = client.post(tasks, json={"title": "Buy milk"}).json()
    assert client.put(f"{tasks}/{milk['id']}", json={"title": "Buy oat milk"}).status_code == 200
    assert client.patch(f"{tasks}/{milk['id']}/complete").json()["completed"] is True
    bread = client.post(tasks, json={"title": "Bread"}).json()
    assert client.delete(f"{tasks}/{bread['id']}").status_code == 204

    # The token expires: the stream ends, and the snippet asks for a new token, which waits.
    tab.wait_for_function("feed.streams[0].ends.length > 0", timeout=WAIT_MS)
    frontend.wait_held()
    # Written while the page has no stream: the next one must catch up with them.
    assert client.patch(f"{tasks}/{milk['id']}/complete").json()["completed"] is False
    assert client.put(f"{tasks}/{milk['id']}", json={"description": "Two litres"}).is_success
    eggs = client.post(tasks, json={"title": "Eggs"}).json()
    assert client.delete(f"{tasks}/{milk['id']}").status_code == 204
    frontend.release(ttl=900)

    tab.wait_for_function("feed.streams.length === 2 && feed.streams[1].opened", timeout=WAIT_MS)
    # Live again, on the resumed stream.
    assert client.patch(f"{tasks}/{eggs['id']}/complete").json()["completed"] is True

    audit = client.get(f"/api/{user}/audit-events", params={"limit": 500}).json()
    expected = list(reversed(audit["items"]))  # oldest first
    last = expected[-1]["seq"]
    tab.wait_for_function(f"feed.events.some((e) => e.seq === {last})", timeout=WAIT_MS)
    feed: dict[str, Any] = tab.evaluate("feed")
    tab.evaluate("unsubscribe()")
    client.close()

    # Every event once, in order, exactly as GET /audit-events shows it.
    assert [e["action"] for e in feed["events"]] == [
        "task.created",
        "task.updated",
        "task.completed",
        "task.created",
        "task.deleted",
        "task.reopened",
        "task.updated",
        "task.created",
        "task.deleted",
        "task.completed",
    ]
    assert [e["seq"] for e in feed["events"]] == list(range(1, 11))
    assert feed["events"] == expected

    # Two streams: the first ended at the token's expiry, the second opened with a new ticket
    # after the last id the page had applied.
    first, second = feed["streams"]
    assert first["ends"] == [{"reason": "token_expired"}]
    assert second["ends"] == []
    first_url, second_url = urlsplit(first["url"]), urlsplit(second["url"])
    assert parse_qs(first_url.query)["after"] == ["0"]
    assert parse_qs(second_url.query)["after"] == [str(second["lastSeq"])]
    assert parse_qs(first_url.query)["ticket"] != parse_qs(second_url.query)["ticket"]
    assert feed["reloads"] == 0
    assert frontend.token_requests == 2
    # No CORS or other error in the console in the normal flow.
    assert problems == []


def test_the_readme_feed_snippet_opens_no_stream_once_unsubscribed(
    feed_page: tuple[Page, list[str]], api: LiveServer, frontend: FeedOrigin
) -> None:
    """`unsubscribe()` while the snippet waits for a token and ticket (React runs an effect's
    cleanup right after it in development's StrictMode; a page is left), or for its backoff
    timer: the stream it was about to open is never opened (it leaked: a slot of the user's
    streams, one of the browser's 6 connections to the API, events to a gone component)."""
    tab, problems = feed_page
    user = frontend.user_id
    tab.goto(frontend.origin + "/")
    tab.wait_for_function("window.feedReady === true", timeout=WAIT_MS)

    # Unsubscribed while the first token request waits.
    frontend.ttl = 900
    frontend.hold()
    tab.evaluate("([api, user]) => startFeed(api, user)", [api.url, user])
    frontend.wait_held()
    tab.evaluate("unsubscribe()")
    requests = frontend.token_requests
    frontend.release(ttl=900)
    # Long enough for the ticket and the stream that would follow it.
    tab.wait_for_timeout(3000)
    assert tab.evaluate("feed.streams.length") == 0
    assert requests == frontend.token_requests

    # Unsubscribed while waiting to reconnect, after a stream ended (its token expired).
    frontend.ttl = 3
    tab.evaluate("([api, user]) => startFeed(api, user)", [api.url, user])
    tab.wait_for_function("feed.streams.length === 1 && feed.streams[0].opened", timeout=WAIT_MS)
    tab.wait_for_function("feed.streams[0].ends.length > 0", timeout=WAIT_MS)
    tab.evaluate("unsubscribe()")
    tab.wait_for_timeout(4000)  # past the snippet's backoff (1 s, then 2 s)
    assert tab.evaluate("feed.streams.length") == 1
    assert problems == []


def test_the_readme_feed_snippet_follows_from_the_seq_it_is_given(
    feed_page: tuple[Page, list[str]], api: LiveServer, frontend: FeedOrigin
) -> None:
    """A page that loaded the tasks follows changes from then on: given the newest seq read
    before that load, the snippet's first stream starts after it. It always started after 0,
    replaying the user's whole history at every page load (1.4 MB for 1,227 events), every
    reminder ever fired included, to an `onChange` that may notify the user of each."""
    tab, problems = feed_page
    user, frontend.user_id = frontend.user_id, random_id()  # a user of this test's own
    try:
        tasks = f"/api/{frontend.user_id}/tasks"
        client = httpx.Client(
            base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {frontend.issue()}"}
        )
        for title in ("Old", "Older"):
            assert client.post(tasks, json={"title": title}).status_code == 201
        # What the page does before it loads the tasks: the newest seq.
        audit = client.get(f"/api/{frontend.user_id}/audit-events", params={"limit": 1}).json()
        newest = audit["items"][0]["seq"]
        frontend.ttl = 900
        tab.goto(frontend.origin + "/")
        tab.wait_for_function("window.feedReady === true", timeout=WAIT_MS)
        tab.evaluate(
            "([api, user, from]) => startFeed(api, user, from)", [api.url, frontend.user_id, newest]
        )
        tab.wait_for_function(
            "feed.streams.length === 1 && feed.streams[0].opened", timeout=WAIT_MS
        )
        assert client.post(tasks, json={"title": "New"}).status_code == 201
        tab.wait_for_function(f"feed.events.some((e) => e.seq === {newest + 1})", timeout=WAIT_MS)
        feed: dict[str, Any] = tab.evaluate("feed")
        tab.evaluate("unsubscribe()")
        client.close()
    finally:
        frontend.user_id = user
    assert [e["seq"] for e in feed["events"]] == [newest + 1]
    assert parse_qs(urlsplit(feed["streams"][0]["url"]).query)["after"] == [str(newest)]
    assert problems == []
