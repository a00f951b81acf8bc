"""GET /api/{user_id}/events: the change feed over real HTTP, read by a streaming client."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from audit.recorder import AuditContext, record_event
from service.app import create_app
from service.auth import create_dev_token
from service.database import Database, build_engine
from service.settings import Settings
from tests.audit_helpers import scratch_database, tampering
from tests.feed_helpers import FeedReader, wait_listening, wait_streams
from tests.reliability_helpers import (
    TcpProxy,
    proxied_url,
    server_address,
    terminate,
    wait_until,
)
from tests.support import TEST_SECRET, ApiUser, LiveServer, assert_validation_error


@contextmanager
def serve(settings: Settings, database: Database, **overrides: Any) -> Iterator[LiveServer]:
    app = create_app(settings.model_copy(update=overrides), database)
    with LiveServer(app) as server:
        wait_listening(app)
        server.app = app  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    with serve(settings, database) as live:
        yield live


def feed(server: LiveServer, user: ApiUser, **kwargs: Any) -> FeedReader:
    headers = kwargs.pop("headers", user.headers)
    return FeedReader(server.url, f"/api/{user.user_id}/events", headers=headers, **kwargs)


def write(http: httpx.Client, user: ApiUser, method: str, path: str = "", **kwargs: Any) -> Any:
    response = http.request(method, user.url(path), headers=user.headers, **kwargs)
    assert response.status_code in (200, 201, 204), response.text
    return response.json() if response.content else None


def audit_items(http: httpx.Client, user: ApiUser) -> list[dict[str, Any]]:
    response = http.get(f"/api/{user.user_id}/audit-events?limit=500", headers=user.headers)
    assert response.status_code == 200
    return list(reversed(response.json()["items"]))


def test_changes_stream_as_they_commit_with_the_audit_feed_json(
    server: LiveServer, user: ApiUser
) -> None:
    with server.client() as http, feed(server, user) as reader:
        assert reader.status == 200
        assert reader.response_headers is not None
        assert reader.response_headers["content-type"].startswith("text/event-stream")
        assert reader.response_headers["cache-control"] == "no-store, no-transform"
        # HTTP/1.1's default, forbidden in HTTP/2, and beside uvicorn's `close` in the drain.
        connection = [v.lower() for v in reader.response_headers.get_list("connection")]
        assert "keep-alive" not in connection, connection
        task = write(http, user, "POST", json={"title": "Live", "description": "d"})
        write(http, user, "PUT", f"/{task['id']}", json={"title": "Live 2"})
        write(http, user, "PATCH", f"/{task['id']}/complete")
        write(http, user, "DELETE", f"/{task['id']}")
        reader.wait_for_seq(4)
        items = audit_items(http, user)
    assert reader.retry_ms == 2000
    assert reader.seqs == [1, 2, 3, 4]
    assert [e.event for e in reader.task_events] == [
        "task.created",
        "task.updated",
        "task.completed",
        "task.deleted",
    ]
    assert [e.json() for e in reader.task_events] == items


def test_the_stream_tells_a_compressing_proxy_to_leave_it_alone(
    server: LiveServer, user: ApiUser
) -> None:
    """Next.js's server (rewrites of `/api/*` to this API) and Express's `compression` gzip a
    proxied `text/event-stream` unless `Cache-Control` has `no-transform`, and gzip holds
    the small events, `retry:` and heartbeats back: through such a proxy an EventSource
    received nothing (0 bytes seconds after a commit, by hand with compression + http-proxy)."""
    with feed(server, user) as reader:
        assert reader.response_headers is not None
        directives = {part.strip() for part in reader.response_headers["cache-control"].split(",")}
    assert {"no-store", "no-transform"} <= directives


def test_only_the_users_own_events_arrive(server: LiveServer, make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    with server.client() as http, feed(server, alice) as reader:
        write(http, bob, "POST", json={"title": "Bob's"})
        write(http, alice, "POST", json={"title": "Alice's"})
        reader.wait_for_seq(1)
        write(http, bob, "POST", json={"title": "Bob's again"})
        write(http, alice, "POST", json={"title": "Alice's again"})
        reader.wait_for_seq(2)
    assert [e.json()["user_id"] for e in reader.task_events] == [alice.user_id] * 2
    assert [e.json()["after"]["title"] for e in reader.task_events] == [
        "Alice's",
        "Alice's again",
    ]


def test_resume_with_after_or_last_event_id_replays_then_goes_live(
    server: LiveServer, user: ApiUser
) -> None:
    with server.client() as http:
        task = write(http, user, "POST", json={"title": "t0"})
        for n in range(1, 5):
            write(http, user, "PUT", f"/{task['id']}", json={"title": f"t{n}"})
        with feed(server, user, params={"after": 2}) as by_query:
            by_query.wait_for_seq(5)
            write(http, user, "PUT", f"/{task['id']}", json={"title": "t5"})
            by_query.wait_for_seq(6)
        headers = {**user.headers, "Last-Event-ID": "4"}
        # The header (what EventSource sends on reconnect) wins over the query.
        with feed(server, user, headers=headers, params={"after": 1}) as by_header:
            by_header.wait_for_seq(6)
    assert by_query.seqs == [3, 4, 5, 6]
    assert by_header.seqs == [5, 6]


def test_an_eventsource_polyfills_last_event_id_in_the_url_resumes(
    server: LiveServer, user: ApiUser
) -> None:
    """event-source-polyfill, used to send `Authorization` from a browser, reconnects with
    `?lastEventId=N` in the URL (the header it cannot resend): it resumes after N, as the
    header would, and an unknown parameter would have refused the reconnect."""
    url = f"/api/{user.user_id}/events"
    with server.client() as http:
        task = write(http, user, "POST", json={"title": "t0"})
        for n in range(1, 4):
            write(http, user, "PUT", f"/{task['id']}", json={"title": f"t{n}"})
        with feed(server, user, params={"lastEventId": "2", "after": 1}) as polyfill:
            polyfill.wait_for_seq(4)
        headers = {**user.headers, "Last-Event-ID": "3"}
        with feed(server, user, headers=headers, params={"lastEventId": "1"}) as both:
            both.wait_for_seq(4)
        # Each refusal's message names what the client sent, not the other one.
        for headers, params, field, name in (
            ({"Last-Event-ID": "x"}, {}, "header.last-event-id", "Last-Event-ID"),
            ({}, {"lastEventId": "x"}, "query.lastEventId", "lastEventId"),
        ):
            answer = http.get(url, headers={**user.headers, **headers}, params=params)
            refused = assert_validation_error(answer, field)["errors"]
            assert refused[0]["message"].startswith(f"{name} must be the id"), refused
    assert polyfill.seqs == [3, 4]
    assert both.seqs == [4]  # the header wins


def test_a_stream_without_a_valid_token_is_a_401_before_its_parameters_are_looked_at(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """As on every other route: no token, or a bad one, is a 401 counted by address, whatever
    else is wrong with the request. Only a request with a ticket has its own mistakes
    refused first, so that they do not spend the ticket."""
    with (
        serve(settings, database, rate_limit_anonymous="3/minute") as server,
        server.client() as http,
    ):
        for url, headers in (
            (f"/api/{user.user_id}/events?bogus=1", {}),
            ("/api/%20/events", {"Authorization": "Bearer not-a-token"}),
            (f"/api/{user.user_id}/events?after=-1", {}),
        ):
            assert http.get(url, headers=headers).status_code == 401, url
        refused = http.get(f"/api/{user.user_id}/events?bogus=2")
        assert refused.status_code == 429, refused.text
        # With a valid token the request's own mistakes are a 400.
        answer = http.get("/api/%20/events", headers=user.headers)
        assert_validation_error(answer, "path.user_id")


def test_a_resume_point_past_the_newest_event_ends_the_stream_with_the_latest_seq(
    server: LiveServer, make_user: Any
) -> None:
    """A stored id from another database (one reset since): the stream used to wait, silently
    skipping every new event up to that id. It ends at once, naming where to resume; a resume
    at exactly the newest event still waits for the next one."""
    user, newcomer = make_user(), make_user()
    with server.client() as http:
        write(http, user, "POST", json={"title": "one"})
        write(http, user, "POST", json={"title": "two"})
        ticket_url = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()[
            "stream_url"
        ]
        ahead = [
            feed(server, user, params={"after": 5}),
            feed(server, user, headers={**user.headers, "Last-Event-ID": "1042"}),
            FeedReader(server.url, f"{ticket_url}&after=3"),  # EventSource's way in
        ]
        for reader in ahead:
            with reader:
                assert reader.status == 200
                end = reader.wait_for_end(timeout=10)
            assert end.json() == {"reason": "resume_point_ahead", "latest_seq": 2}
            assert reader.task_events == []
        with feed(server, newcomer, params={"after": 1}) as empty_chain:
            end = empty_chain.wait_for_end(timeout=10)
        assert end.json() == {"reason": "resume_point_ahead", "latest_seq": 0}
        # What the client does next: resume from latest_seq, and gets what follows it.
        with feed(server, user, params={"after": 2}) as at_head:
            write(http, user, "POST", json={"title": "three"})
            at_head.wait_for_seq(3)
            assert not at_head.ended.is_set()
    assert at_head.seqs == [3]
    assert [e.event for e in at_head.events] == ["task.created"]


def test_reconnects_during_racing_writes_lose_and_repeat_nothing(
    server: LiveServer, user: ApiUser
) -> None:
    """Writers keep committing while the client drops and resumes from its last id, again
    and again: what it received, end to end, is exactly seq 1..N once each, in order."""
    writers, per_writer = 3, 25
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with server.client() as http:
                task = write(http, user, "POST", json={"title": f"w{n}"})
                for i in range(per_writer - 1):
                    write(http, user, "PUT", f"/{task['id']}", json={"title": f"w{n}-{i}"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    received: list[int] = []
    for thread in threads:
        thread.start()
    try:
        reconnects = 0
        total = writers * per_writer
        while not received or received[-1] < total:
            headers = dict(user.headers)
            if received:
                headers["Last-Event-ID"] = str(received[-1])
            with feed(server, user, headers=headers) as reader:
                # Read a few events (or until the writes are over), then drop the connection.
                wait_until(
                    lambda r=reader: (
                        len(r.task_events) >= 7 or not any(t.is_alive() for t in threads)
                    ),
                    "some events",
                )
                if not any(t.is_alive() for t in threads):
                    reader.wait_for_seq(total)
            received.extend(reader.seqs)
            reconnects += 1
            if reconnects > 200:
                break
    finally:
        for thread in threads:
            thread.join()
    assert not errors
    assert reconnects >= 3
    assert received == list(range(1, total + 1))


def test_a_stream_ticket_opens_the_feed_once(server: LiveServer, user: ApiUser) -> None:
    with server.client() as http:
        answer = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers)
        assert answer.status_code == 201, answer.text
        assert answer.headers["cache-control"] == "no-store"
        body = answer.json()
        ticket = body["ticket"]
        assert body["stream_url"] == f"/api/{user.user_id}/events?ticket={ticket}"
        with FeedReader(server.url, body["stream_url"]) as reader:
            assert reader.status == 200
            write(http, user, "POST", json={"title": "via ticket"})
            reader.wait_for_seq(1)
        # Single use: the same URL again is refused.
        with FeedReader(server.url, body["stream_url"]) as again:
            assert again.status == 401
            assert b"invalid or already used stream ticket" in again.body


def test_a_malformed_stream_request_does_not_spend_its_ticket(
    server: LiveServer, user: ApiUser
) -> None:
    """A wrong Accept or Last-Event-ID is refused before the ticket is redeemed: the
    client fixes the request and opens the stream with the same ticket."""
    with server.client() as http:
        body = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()
        url = body["stream_url"]
        assert http.get(url, headers={"Accept": "application/json"}).status_code == 406
        assert_validation_error(
            http.get(url, headers={"Last-Event-ID": "x"}), "header.last-event-id"
        )
        with FeedReader(server.url, url) as reader:
            assert reader.status == 200


def test_a_token_expiring_past_year_9999_gets_a_ticket_bounded_by_its_ttl(
    server: LiveServer, user: ApiUser, settings: Settings
) -> None:
    """The ticket's expiry is the earlier of its TTL and the token's `exp`, and an `exp`
    past what a datetime holds is simply the later one (it was a 500)."""
    for exp in (253_402_300_800, 10**20):
        token = jwt.encode({"sub": user.user_id, "exp": exp}, TEST_SECRET, algorithm="HS256")
        with server.client() as http:
            before = datetime.now(UTC)
            answer = http.post(
                f"/api/{user.user_id}/events/tickets",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert answer.status_code == 201, answer.text
        expires_at = datetime.fromisoformat(answer.json()["expires_at"])
        ttl = timedelta(seconds=settings.feed_ticket_ttl_seconds)
        assert before < expires_at <= datetime.now(UTC) + ttl


def test_a_bearer_stream_with_an_exp_past_a_floats_range_stays_open(
    server: LiveServer, user: ApiUser
) -> None:
    """An `exp` too large for a float (JSON integers have no bound) is simply far off: the
    stream waits for events as for any token (it was cut off after its first bytes)."""
    token = jwt.encode({"sub": user.user_id, "exp": 10**400}, TEST_SECRET, algorithm="HS256")
    far = ApiUser(user.user_id, token)
    with server.client() as http, feed(server, far) as reader:
        assert reader.status == 200
        write(http, user, "POST", json={"title": "far off"})
        reader.wait_for_seq(1)
        assert not reader.ended.is_set()


def test_a_ticket_is_refused_when_expired_for_another_user_or_made_up(
    settings: Settings, database: Database, make_user: Any
) -> None:
    alice, bob = make_user(), make_user()
    with serve(settings, database, feed_ticket_ttl_seconds=1) as server, server.client() as http:
        tickets = [
            http.post(f"/api/{alice.user_id}/events/tickets", headers=alice.headers).json()[
                "ticket"
            ]
            for _ in range(2)
        ]
        stolen = http.get(f"/api/{bob.user_id}/events", params={"ticket": tickets[0]})
        assert stolen.status_code == 403
        time.sleep(1.5)
        expired = http.get(f"/api/{alice.user_id}/events", params={"ticket": tickets[1]})
        assert expired.status_code == 401
        assert "stream ticket expired" in expired.json()["detail"]
        bogus = http.get(f"/api/{alice.user_id}/events", params={"ticket": "x" * 43})
        assert bogus.status_code == 401
        missing = http.get(f"/api/{alice.user_id}/events")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"  # no token: no error code
        wrong_user = http.get(f"/api/{bob.user_id}/events", headers=alice.headers)
        assert wrong_user.status_code == 403


def test_the_ticket_never_reaches_traces_or_logs(
    settings: Settings, user: ApiUser, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # An engine of its own: an engine's statements are traced by the first provider given
    # with it (observability.tracing.instrument_engine), and the shared one's is not this.
    own = Database(build_engine(settings))
    app = create_app(settings, own, tracer_provider=provider)
    caplog.set_level(logging.DEBUG)
    try:
        with LiveServer(app) as server, server.client() as http:
            wait_listening(app)
            ticket = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()[
                "ticket"
            ]
            with FeedReader(server.url, f"/api/{user.user_id}/events?ticket={ticket}") as reader:
                write(http, user, "POST", json={"title": "traced"})
                reader.wait_for_seq(1)
    finally:
        own.dispose()
    spans = exporter.get_finished_spans()
    stream_spans = [
        s for s in spans if (s.attributes or {}).get("http.route") == ("/api/{user_id}/events")
    ]
    assert stream_spans, [s.name for s in spans]
    # The statements' spans are among those searched (the ticket's own INSERT and lookup).
    assert any(s.attributes and "db.statement" in s.attributes for s in spans)
    assert stream_spans[0].attributes is not None
    assert stream_spans[0].attributes.get("url.query") == "ticket=REDACTED"
    assert stream_spans[0].attributes.get("enduser.id") == user.user_id
    for span in spans:
        assert ticket not in repr(dict(span.attributes or {}))
        for event in span.events:
            assert ticket not in repr(dict(event.attributes or {}))
    # The server's own lines (the test's HTTP client logs its URLs, ticket included).
    server_lines = [
        record.getMessage() + repr(record.__dict__)
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    ]
    assert any("/events" in line for line in server_lines)  # the access line was written
    assert not [line for line in server_lines if ticket in line]


def test_an_expired_token_ends_the_stream_at_its_expiry(
    server: LiveServer, settings: Settings, make_user: Any
) -> None:
    user = make_user()
    assert settings.better_auth_secret is not None
    token = create_dev_token(TEST_SECRET, user.user_id, ttl_seconds=2)
    short = ApiUser(user.user_id, token)
    with server.client() as http, feed(server, short) as reader:
        write(http, user, "POST", json={"title": "before expiry"})
        reader.wait_for_seq(1)
        end = reader.wait_for_end(timeout=20)
        ended_at = time.time()
    assert end.json() == {"reason": "token_expired"}
    exp = int(__import__("jwt").decode(token, options={"verify_signature": False})["exp"])
    assert ended_at >= exp
    wait_streams(server.app, 0)  # type: ignore[attr-defined]


def test_a_token_past_its_exp_within_the_leeway_gets_401_not_a_dead_stream(
    server: LiveServer, make_user: Any
) -> None:
    """Admitted by the leeway, such a token got a ticket that had already expired (then 401
    on the stream) or a stream that ended at once; the client never learned to refresh."""
    user = make_user()
    now = int(time.time())
    claims = {"sub": user.user_id, "iat": now - 60, "exp": now - 5}
    stale = ApiUser(user.user_id, __import__("jwt").encode(claims, TEST_SECRET, "HS256"))
    with server.client() as http:
        assert http.get(stale.url(), headers=stale.headers).status_code == 200  # the leeway
        answer = http.post(f"/api/{user.user_id}/events/tickets", headers=stale.headers)
        assert answer.status_code == 401
        assert answer.json()["type"].endswith("/token-expired")
    with feed(server, stale) as reader:
        assert reader.status == 401


def test_the_ticket_stream_ends_when_the_token_it_came_from_expires(
    server: LiveServer, make_user: Any
) -> None:
    user = make_user()
    short = ApiUser(user.user_id, create_dev_token(TEST_SECRET, user.user_id, ttl_seconds=2))
    with server.client() as http:
        body = http.post(f"/api/{user.user_id}/events/tickets", headers=short.headers).json()
        with FeedReader(server.url, body["stream_url"]) as reader:
            end = reader.wait_for_end(timeout=20)
    assert end.json() == {"reason": "token_expired"}


def test_bad_resume_points_and_accept_headers_are_4xx(server: LiveServer, user: ApiUser) -> None:
    url = f"/api/{user.user_id}/events"
    with server.client() as http:
        # b"\xb2" is '²' once decoded (Latin-1): str.isdigit() says yes, int() says no.
        odd: tuple[str | bytes, ...] = ("abc", "-1", "1.5", "99999999999999999999", "1" * 33)
        for header in (*odd, b"\xb2", b"5\xb9", "\u0661".encode("utf-8")):
            answer = http.get(url, headers={**user.headers, "Last-Event-ID": header})
            assert_validation_error(answer, "header.last-event-id")
        assert http.get(url, headers=user.headers, params={"after": -1}).status_code == 400
        answer = http.get(url, headers={**user.headers, "Accept": "application/json"})
        assert answer.status_code == 406
        answer = http.get(url, headers={**user.headers, "Accept": "text/event-stream;q=0"})
        assert answer.status_code == 406


def test_a_resume_point_is_written_as_after_is_plain_digits(
    server: LiveServer, user: ApiUser
) -> None:
    """`after=05` was a 400 (plain digits only, as everywhere) while `Last-Event-ID: 05` and
    `?lastEventId=%205` resumed after 5: one value, read two ways. An EventSource sends back
    the id as the feed wrote it, so no client that resumes from the feed sends either."""
    url = f"/api/{user.user_id}/events"
    with server.client() as http:
        for text in ("05", "00", "+5", "5_0"):
            answer = http.get(url, headers={**user.headers, "Last-Event-ID": text})
            assert_validation_error(answer, "header.last-event-id")
        for text in ("05", " 5", "5 ", "+5", "5_0", " "):
            answer = http.get(url, headers=user.headers, params={"lastEventId": text})
            assert_validation_error(answer, "query.lastEventId")
            answer = http.get(url, headers=user.headers, params={"after": text})
            assert_validation_error(answer, "query.after")
    # Empty is no resume point (a polyfill's, before any event had an id); 0 is one.
    with feed(server, user, params={"lastEventId": ""}) as empty:
        assert empty.status == 200
    with feed(server, user, headers={**user.headers, "Last-Event-ID": "0"}) as zero:
        assert zero.status == 200


def test_streams_are_capped_per_user_and_per_worker(
    settings: Settings, database: Database, make_user: Any
) -> None:
    alice, bob, carol = make_user(), make_user(), make_user()
    limits = {"feed_max_streams_per_user": 2, "feed_max_streams_per_worker": 3}
    with serve(settings, database, **limits) as server:
        with feed(server, alice) as a1, feed(server, alice) as a2:
            assert (a1.status, a2.status) == (200, 200)
            with feed(server, alice) as a3:
                assert a3.status == 429
                assert a3.response_headers is not None
                assert a3.response_headers["retry-after"] == "10"
            with feed(server, bob) as b1:
                assert b1.status == 200
                with feed(server, carol) as c1:
                    assert c1.status == 429
                    problem = json.loads(c1.body)
                    assert problem["type"] == "tag:todo-api,2026:problems/rate-limited"
                    assert "3 feed streams" in problem["detail"]
        # Closed streams give their slots back.
        wait_streams(server.app, 0)  # type: ignore[attr-defined]
        with feed(server, carol) as c2:
            assert c2.status == 200


def test_a_stream_refused_for_capacity_leaves_its_ticket_usable(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """A 429 for too many streams is the server's refusal, not the ticket's: the same ticket
    opens the stream once a slot is free (and only once)."""
    with serve(settings, database, feed_max_streams_per_user=1) as server:
        with server.client() as http:
            answer = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers)
            url = answer.json()["stream_url"]
        with feed(server, user) as first:
            assert first.status == 200
            with FeedReader(server.url, url) as refused:
                assert refused.status == 429
        wait_streams(server.app, 0)  # type: ignore[attr-defined]
        with FeedReader(server.url, url) as opened:
            assert opened.status == 200
        with FeedReader(server.url, url) as again:
            assert again.status == 401


def test_heartbeat_comments_flow_on_an_idle_stream(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with (
        serve(settings, database, feed_heartbeat_seconds=0.2) as server,
        server.client() as http,
        http.stream(
            "GET",
            f"/api/{user.user_id}/events",
            headers={**user.headers, "Accept": "text/event-stream"},
        ) as response,
    ):
        seen = b""
        for chunk in response.iter_bytes():
            seen += chunk
            if seen.count(b": heartbeat") >= 2:
                break
    assert b": heartbeat\r\n\r\n" in seen


def test_heartbeats_after_an_event_are_no_events(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """A browser dispatches no event for a heartbeat (a block without data), also after an
    event set its last id; the suite's reader did (httpx-sse yields one with that id), so a
    test whose stream stayed open past a heartbeat saw its last seq again."""
    with serve(settings, database, feed_heartbeat_seconds=0.2) as server, server.client() as http:
        write(http, user, "POST", json={"title": "t0"})
        with feed(server, user) as reader:
            reader.wait_for_seq(1)
            time.sleep(1)
    assert reader.seqs == [1]


def test_the_listener_reconnects_and_nothing_committed_meanwhile_is_lost(
    server: LiveServer, user: ApiUser, database: Database
) -> None:
    app = server.app  # type: ignore[attr-defined]
    with server.client() as http, feed(server, user) as reader:
        write(http, user, "POST", json={"title": "before"})
        reader.wait_for_seq(1)
        with database.engine.connect() as conn:
            pids = (
                conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'todo-api-feed' AND query ILIKE 'LISTEN%'"
                    )
                )
                .scalars()
                .all()
            )
        before = app.state.feed.connections_made
        assert terminate(database.engine, list(pids)) >= 1
        # Written while the listener may be down: delivered once it is back.
        write(http, user, "POST", json={"title": "during"})
        wait_until(lambda: app.state.feed.connections_made > before, "the listener to reconnect")
        write(http, user, "POST", json={"title": "after"})
        reader.wait_for_seq(3)
    assert reader.seqs == [1, 2, 3]


def test_a_chain_reset_under_an_open_stream_ends_it_with_the_latest_seq(
    settings: Settings, base_settings: Settings, make_user: Any
) -> None:
    """A development database reset under an open tab: the user's chain is gone, the
    connections are cut, the listener reconnects and wakes the stream, which finds the chain
    behind its last id and says so instead of waiting for seqs it has already sent."""
    user = make_user()
    with scratch_database() as url:
        database = Database(build_engine(base_settings, url))
        try:
            with (
                serve(settings, database, database_url=url) as server,
                feed(server, user) as reader,
            ):
                app = server.app  # type: ignore[attr-defined]
                append_filler_events(database, user.user_id, 0, 3)
                reader.wait_for_seq(3)
                with tampering(database.engine) as conn:
                    for table in ("audit_events", "audit_chain_heads"):
                        conn.execute(
                            sa.text(f"DELETE FROM {table} WHERE user_id = :u"),
                            {"u": user.user_id},
                        )
                with database.engine.connect() as conn:
                    pids = list(
                        conn.execute(
                            sa.text(
                                "SELECT pid FROM pg_stat_activity WHERE datname ="
                                " current_database() AND application_name = 'todo-api-feed'"
                            )
                        ).scalars()
                    )
                before = app.state.feed.connections_made
                assert terminate(database.engine, pids) >= 1
                wait_until(lambda: app.state.feed.connections_made > before, "a new listener")
                end = reader.wait_for_end(timeout=10)
        finally:
            database.dispose()
    assert reader.seqs == [1, 2, 3]
    assert end.json() == {"reason": "resume_point_ahead", "latest_seq": 0}


def append_filler_events(database: Database, user_id: str, written: int, count: int) -> int:
    """`count` large events appended to the user's chain by the real recorder, in one
    transaction (faster than as many HTTP writes; the feed does not care what they are)."""
    state = {"text": "x" * 8000}
    with database.unit_of_work() as session:
        for n in range(written + 1, written + count + 1):
            record_event(
                session,
                AuditContext(actor_id=user_id),
                user_id=user_id,
                action="test.filler",
                entity_type="test",
                entity_id=str(n),
                before=None,
                after=state,
                diff_fields=(),
            )
    return written + count


def test_a_client_that_stops_reading_is_disconnected_and_resumes_from_its_last_id(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """The server holds at most a page of events per stream; a client that stops reading
    fills its socket buffers, the next write waits FEED_SEND_TIMEOUT_SECONDS, and the server
    closes the stream. The client then resumes with Last-Event-ID and misses nothing."""
    with serve(settings, database, feed_send_timeout_seconds=0.5) as server:
        app = server.app  # type: ignore[attr-defined]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        request = (
            f"GET /api/{user.user_id}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {user.token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        sock.sendall(request.encode())
        wait_streams(app, 1)
        written = 0
        # Not reading: keep committing large events until the server gives up on us.
        while app.state.feed.stream_count == 1 and written < 20_000:
            written = append_filler_events(database, user.user_id, written, 100)
        wait_streams(app, 0)
        # Now read what reached the socket; the server has closed the connection.
        sock.settimeout(10)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        sock.close()
        # Events whose terminating blank line arrived (the last one may be cut short).
        complete = raw.rsplit(b"\r\n\r\n", 1)[0]
        seqs = [int(line[4:]) for line in complete.split(b"\r\n") if line.startswith(b"id: ")]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < written
        headers = {**user.headers, "Last-Event-ID": str(seqs[-1] if seqs else 0)}
        with feed(server, user, headers=headers) as resumed:
            resumed.wait_for_seq(written)
    assert seqs + resumed.seqs == list(range(1, written + 1))


def test_the_listener_connects_to_feed_database_url_and_survives_its_loss(
    settings: Settings, database: Database, database_url: str, user: ApiUser
) -> None:
    """FEED_DATABASE_URL (the direct endpoint, where the pool goes through a pooler that does
    not relay LISTEN): here the same database behind a proxy that only the listener uses, cut
    and restored while writes go on through the pool."""
    target = sa.make_url(database_url)
    with TcpProxy(server_address(target)) as proxy:
        feed_url = proxied_url(target, proxy.port)
        with serve(settings, database, feed_database_url=feed_url) as server:
            app = server.app  # type: ignore[attr-defined]
            with server.client() as http, feed(server, user) as reader:
                write(http, user, "POST", json={"title": "one"})
                reader.wait_for_seq(1)
                proxy.cut()
                wait_until(lambda: not app.state.feed.listening, "the listener to notice")
                write(http, user, "POST", json={"title": "two, unheard"})
                proxy.restore()
                wait_until(lambda: app.state.feed.connections_made >= 2, "a new listener")
                write(http, user, "POST", json={"title": "three"})
                reader.wait_for_seq(3)
    assert reader.seqs == [1, 2, 3]


def test_a_stream_opened_with_a_ticket_counts_against_its_users_read_limit(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with serve(settings, database, rate_limit_read="1/minute") as server, server.client() as http:
        url = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()[
            "stream_url"
        ]
        with FeedReader(server.url, url) as reader:
            assert reader.status == 200
        limited = http.get(user.url(), headers=user.headers)
        assert limited.status_code == 429
        assert limited.headers["RateLimit-Policy"] == '"read";q=1;w=60'


def deaf_feed_url(database_url: str, proxy: TcpProxy) -> str:
    """The test database through `proxy`, unencrypted so that the proxy can read the server's
    messages (and drop its notifications)."""
    url = sa.make_url(proxied_url(sa.make_url(database_url), proxy.port))
    query = {"sslmode": "disable", "gssencmode": "disable"}
    return url.update_query_dict(query).render_as_string(hide_password=False)


def feed_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "service.events" and r.levelno == logging.ERROR
    ]


def test_a_listener_that_hears_nothing_is_reported_and_its_streams_are_refused(
    settings: Settings,
    database: Database,
    database_url: str,
    user: ApiUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Behind a transaction pooler, LISTEN succeeds and nothing is ever delivered: streams
    used to open and send only heartbeats, with /readyz ready and nothing logged. Here the
    listener's connection goes through a proxy that drops every NotificationResponse. The
    hub's probe (notified from another connection) does not arrive: one ERROR names
    FEED_DATABASE_URL, /readyz stays ready and reports the feed, tasks still work, and a
    stream is refused with 503 (its ticket given back). Once notifications flow again, the
    next attempt verifies a listener and streams are live."""
    caplog.set_level(logging.INFO, logger="service.events")
    with TcpProxy(server_address(sa.make_url(database_url)), frames_server_messages=True) as proxy:
        proxy.relay_notifications = False
        overrides = {
            "feed_database_url": deaf_feed_url(database_url, proxy),
            "feed_ticket_ttl_seconds": 300,  # the ticket refused with 503 is used after
        }
        app = create_app(settings.model_copy(update=overrides), database)
        with LiveServer(app) as server, server.client() as http:
            hub = app.state.feed
            wait_until(lambda: hub.state == "not_receiving", "the probe to be missed")
            assert proxy.notifications_dropped >= 1  # the probe was sent, and dropped
            ready = http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "ready"
            assert ready.json()["feed"] == "not_receiving"
            [error] = feed_errors(caplog)
            assert "FEED_DATABASE_URL" in error
            assert "pooler" in error
            write(http, user, "POST", json={"title": "tasks still work"})
            with feed(server, user) as refused:
                assert refused.status == 503
                assert refused.response_headers is not None
                assert refused.response_headers["retry-after"] == "10"
                assert "cannot receive changes" in json.loads(refused.body)["detail"]
            url = http.post(f"/api/{user.user_id}/events/tickets", headers=user.headers).json()[
                "stream_url"
            ]
            with FeedReader(server.url, url) as by_ticket:
                assert by_ticket.status == 503
            # Notifications flow again (FEED_DATABASE_URL fixed, the pooler gone): the next
            # attempt's listener is verified, and the same ticket opens a live stream.
            proxy.relay_notifications = True
            wait_until(lambda: hub.state == "ok", "a verified listener", timeout=60)
            assert http.get("/readyz").json()["feed"] == "ok"
            with FeedReader(server.url, url) as reader:
                assert reader.status == 200
                write(http, user, "POST", json={"title": "live"})
                reader.wait_for_seq(2)
    assert reader.seqs == [1, 2]
    assert len(feed_errors(caplog)) == 1


def test_a_stream_opened_while_the_listener_is_being_verified_is_served(
    settings: Settings, database: Database, database_url: str, user: ApiUser
) -> None:
    """Before the probe's verdict (at start, after a reconnect) a stream is accepted, as it
    always was: a 503 then would stop a browser's EventSource for a state that lasts
    milliseconds. Here the verdict is that nothing arrives, and the stream is told."""
    with TcpProxy(server_address(sa.make_url(database_url)), frames_server_messages=True) as proxy:
        proxy.relay_notifications = False
        overrides = {"feed_database_url": deaf_feed_url(database_url, proxy)}
        app = create_app(settings.model_copy(update=overrides), database)
        with LiveServer(app) as server:
            hub = app.state.feed
            wait_until(lambda: hub.listening, "a listener")
            assert hub.state == "connecting"  # the probe is given up on after 5 s
            with feed(server, user) as reader:
                assert reader.status == 200
                end = reader.wait_for_end(timeout=60)
            assert hub.state == "not_receiving"
    assert end.json() == {"reason": "feed_unavailable"}


def test_streams_open_when_a_new_listener_hears_nothing_end_with_feed_unavailable(
    settings: Settings, database: Database, database_url: str, user: ApiUser
) -> None:
    """A verified listener's connection is lost and its replacement hears nothing: the open
    streams would wait forever, so they end with `feed_unavailable` (the client reconnects,
    and is refused with 503 until a listener is verified)."""
    with TcpProxy(server_address(sa.make_url(database_url)), frames_server_messages=True) as proxy:
        overrides = {"feed_database_url": deaf_feed_url(database_url, proxy)}
        with (
            serve(settings, database, **overrides) as server,
            server.client() as http,
            feed(server, user) as reader,
        ):
            hub = server.app.state.feed  # type: ignore[attr-defined]
            write(http, user, "POST", json={"title": "heard"})
            reader.wait_for_seq(1)
            proxy.relay_notifications = False
            proxy.cut()
            proxy.restore()
            end = reader.wait_for_end(timeout=60)
            assert hub.state == "not_receiving"
            with feed(server, user) as refused:
                assert refused.status == 503
    assert end.json() == {"reason": "feed_unavailable"}
    assert reader.seqs == [1]
