"""What a browser frontend depends on: problem types, field paths, CORS on every answer,
proxy headers from trusted proxies only, and JWKS start-up checks."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import CORS_EXPOSE_HEADERS, create_app
from service.auth import create_dev_token
from service.database import Database
from service.problem_types import ProblemType
from service.settings import AppEnv, Settings
from tests.feed_helpers import FeedReader
from tests.jwt_helpers import JwksServer, better_auth_claims, generate_key, random_id, sign_hs256
from tests.support import (
    TEST_SECRET,
    ApiUser,
    LiveServer,
    assert_problem,
    assert_validation_error,
    create_task,
    free_port,
    link_url,
)

README = Path(__file__).resolve().parent.parent / "README.md"
FRONTEND = "http://localhost:3000"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(
            f"{r.levelname} {r.getMessage()} {sorted(r.__dict__.items())!r}" for r in self.records
        )


@contextmanager
def captured(*names: str) -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def problem_type(resp: Any, status: int, kind: ProblemType) -> dict[str, Any]:
    body = assert_problem(resp, status)
    assert body["type"] == kind.uri, body
    assert body["title"] == kind.title
    return body


# Problem types --------------------------------------------------------------------------


def test_each_kind_of_problem_has_its_own_type(client: TestClient, user: ApiUser) -> None:
    expired = sign_hs256({"sub": user.user_id, "exp": 1_000_000}, TEST_SECRET)
    bad_signature = sign_hs256({"sub": user.user_id, "exp": 4_000_000_000}, "x" * 40)
    other = sign_hs256({"sub": "someone-else", "exp": 4_000_000_000}, TEST_SECRET)
    url = user.url()

    problem_type(client.get(url), 401, ProblemType.token_missing)
    for token, kind in ((expired, ProblemType.token_expired), (bad_signature, None)):
        resp = client.get(url, headers={"Authorization": f"Bearer {token}"})
        problem_type(resp, 401, kind or ProblemType.token_invalid)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = client.get(url, headers={"Authorization": f"Bearer {other}"})
    problem_type(resp, 403, ProblemType.user_mismatch)
    problem_type(client.get(user.url("/999999"), headers=user.headers), 404, ProblemType.not_found)
    resp = client.post(url, json={"title": ""}, headers=user.headers)
    problem_type(resp, 400, ProblemType.validation)

    task = create_task(client, user, "typed")
    stale = {**user.headers, "If-Match": '"stale"'}
    resp = client.put(user.url(f"/{task['id']}"), json={"title": "x"}, headers=stale)
    problem_type(resp, 412, ProblemType.precondition_failed)

    keyed = {**user.headers, "Idempotency-Key": "k-" + random_id(8)}
    assert client.post(url, json={"title": "one"}, headers=keyed).status_code == 201
    resp = client.post(url, json={"title": "two"}, headers=keyed)
    problem_type(resp, 409, ProblemType.idempotency_conflict)

    resp = client.post(url, content=b"x" * 70_000, headers=user.headers)
    problem_type(resp, 413, ProblemType.body_too_large)
    text = {**user.headers, "Content-Type": "text/plain"}
    resp = client.post(url, content=b"title", headers=text)
    problem_type(resp, 415, ProblemType.unsupported_media_type)


def test_type_uris_are_distinct_and_stable() -> None:
    uris = [kind.uri for kind in ProblemType]
    assert len(set(uris)) == len(uris)
    assert ProblemType.token_expired.uri == "tag:todo-api,2026:problems/token-expired"


def test_readme_documents_every_problem_type() -> None:
    """The README's table lists each type with its status, and nothing else."""
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(tag:todo-api,2026:problems/[a-z-]+)` \| (\d{3}) \|", text, re.M)
    assert {(uri, int(status)) for uri, status in rows} == {
        (kind.uri, kind.status) for kind in ProblemType
    }


# Validation messages and field paths ---------------------------------------------------


def test_validation_messages_have_no_pydantic_prefix(client: TestClient, user: ApiUser) -> None:
    resp = client.post(user.url(), json={"title": "   "}, headers=user.headers)
    body = assert_validation_error(resp, "body.title")
    for error in body["errors"]:
        assert not error["message"].startswith(("Value error", "Assertion failed")), error


def test_body_and_query_fields_follow_one_convention(client: TestClient, user: ApiUser) -> None:
    resp = client.get(user.url(), params={"limit": 0}, headers=user.headers)
    assert_validation_error(resp, "query.limit")
    resp = client.get(user.url(), params={"q": "a\x00"}, headers=user.headers)
    assert_validation_error(resp, "query.q")
    resp = client.post(user.url(), json={"title": "x" * 201}, headers=user.headers)
    assert_validation_error(resp, "body.title")
    resp = client.get(user.url("/0"), headers=user.headers)
    assert_validation_error(resp, "path.task_id")
    resp = client.post(
        user.url(),
        content=b'{"title": ',
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert_validation_error(resp, "body")


# CORS ---------------------------------------------------------------------------------


def test_development_allows_the_next_dev_server_by_default() -> None:
    dev = Settings(_env_file=None, app_env=AppEnv.development)  # type: ignore[call-arg]
    assert dev.effective_cors_origins == ["http://localhost:3000", "http://127.0.0.1:3000"]
    prod = Settings(  # type: ignore[call-arg]
        _env_file=None, app_env=AppEnv.production, better_auth_secret="k" * 40 + "Q"
    )
    assert prod.effective_cors_origins == []
    explicit = Settings(_env_file=None, cors_origins="https://a.example")  # type: ignore[call-arg]
    assert explicit.effective_cors_origins == ["https://a.example"]


@pytest.fixture
def dev_client(settings: Settings, database: Database) -> Iterator[TestClient]:
    """Development settings with no CORS_ORIGINS: what `make run` gives `next dev`."""
    dev = settings.model_copy(update={"app_env": AppEnv.development, "cors_origins": None})
    with TestClient(create_app(dev, database), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:3000"])
def test_next_dev_server_passes_preflight(
    dev_client: TestClient, user: ApiUser, origin: str
) -> None:
    resp = dev_client.options(
        user.url(),
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == origin


def test_a_refused_preflight_is_a_problem_naming_the_refused_headers(
    dev_client: TestClient, user: ApiUser
) -> None:
    resp = dev_client.options(
        user.url(),
        headers={
            "Origin": "https://elsewhere.example",
            "Access-Control-Request-Method": "TRACE",
            "Access-Control-Request-Headers": "authorization, x-made-up",
        },
    )
    body = assert_validation_error(
        resp,
        "header.origin",
        "header.access-control-request-method",
        "header.access-control-request-headers",
    )
    assert len(body["errors"]) == 3
    assert "access-control-allow-origin" not in resp.headers
    assert resp.headers["x-request-id"]
    allowed = dev_client.options(
        user.url(), headers={"Origin": FRONTEND, "Access-Control-Request-Method": "TRACE"}
    )
    assert [e["field"] for e in assert_validation_error(allowed)["errors"]] == [
        "header.access-control-request-method"
    ]
    assert allowed.headers["access-control-allow-origin"] == FRONTEND


def test_every_useful_header_is_exposed(dev_client: TestClient, user: ApiUser) -> None:
    resp = dev_client.get(user.url(), headers={**user.headers, "Origin": FRONTEND})
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    wanted = {
        "etag", "location", "link", "x-total-count", "x-request-id", "x-trace-id",
        "idempotent-replayed", "retry-after", "www-authenticate",
        "ratelimit", "ratelimit-policy", "allow",
    }  # fmt: skip
    assert wanted <= exposed
    assert {h.lower() for h in CORS_EXPOSE_HEADERS} == exposed


def test_unhandled_500_carries_cors_and_request_id(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    dev = settings.model_copy(update={"app_env": AppEnv.development, "cors_origins": None})
    app: FastAPI = create_app(dev, database)

    def explode(user_id: str) -> None:
        raise RuntimeError("kaboom")

    app.add_api_route("/api/{user_id}/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get(
            f"/api/{user.user_id}/explode",
            headers={"Origin": FRONTEND, "X-Request-ID": "req-500"},
        )
    body = problem_type(resp, 500, ProblemType.internal)
    assert "kaboom" not in resp.text and "Traceback" not in resp.text
    assert body["detail"]
    assert resp.headers["access-control-allow-origin"] == FRONTEND
    assert resp.headers["x-request-id"] == "req-500"


# Proxy headers --------------------------------------------------------------------------


FORWARDED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "api.example.com",
    "X-Forwarded-For": "203.0.113.7",
}


def _last_client_ip(database: Database, user_id: str) -> str | None:
    with database.engine.connect() as conn:
        query = sa.text("SELECT client_ip FROM audit_events WHERE user_id = :u ORDER BY seq DESC")
        value = conn.execute(query, {"u": user_id}).scalar()
    return None if value is None else str(value)


def test_forwarded_headers_from_a_trusted_proxy_shape_urls_and_audit(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    trusted = settings.model_copy(update={"trusted_proxies": ["testclient"]})
    with TestClient(create_app(trusted, database)) as client:
        headers = {**user.headers, **FORWARDED}
        resp = client.post(user.url(), json={"title": "a"}, headers=headers)
        assert resp.status_code == 201
        assert resp.headers["Location"].startswith(f"https://api.example.com/api/{user.user_id}/")
        assert _last_client_ip(database, user.user_id) == "203.0.113.7"
        create_task(client, user, "b")
        listed = client.get(user.url(), params={"limit": 1}, headers=headers)
        assert listed.headers["Link"].startswith(f"<https://api.example.com/api/{user.user_id}/")


def test_forwarded_headers_from_anyone_else_are_ignored(
    client: TestClient, database: Database, user: ApiUser
) -> None:
    headers = {**user.headers, **FORWARDED}
    resp = client.post(user.url(), json={"title": "a"}, headers=headers)
    assert resp.headers["Location"].startswith("http://testserver/")
    assert _last_client_ip(database, user.user_id) == "testclient"
    create_task(client, user, "b")
    listed = client.get(user.url(), params={"limit": 1}, headers=headers)
    assert listed.headers["Link"].startswith("<http://testserver/")


# JWKS start-up checks -------------------------------------------------------------------


def test_a_path_in_better_auth_url_is_refused_naming_the_variable() -> None:
    # pydantic wraps the ConfigError (a ValueError) raised in the model validator.
    with pytest.raises(ValueError, match="BETTER_AUTH_URL") as info:
        Settings(_env_file=None, better_auth_url="http://localhost:3000/auth")  # type: ignore[call-arg]
    assert "BETTER_AUTH_URL=http://localhost:3000" in str(info.value)


def test_better_auth_url_ending_in_api_auth_is_corrected_with_a_warning(
    settings: Settings, database: Database
) -> None:
    key = generate_key("EdDSA")
    with JwksServer([key]) as jwks:
        wrong = settings.model_copy(update={"better_auth_url": jwks.origin + "/api/auth"})
        assert wrong.jwks_url == jwks.origin + "/api/auth/jwks"
        assert wrong.expected_issuer == jwks.origin
        with (
            captured("service.app") as logs,
            TestClient(create_app(wrong, database)) as client,
        ):
            user_id = random_id()
            token = key.sign(better_auth_claims(jwks.origin, user_id=user_id))
            resp = client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 200
    warnings = [r for r in logs.records if r.levelno == logging.WARNING]
    assert any("BETTER_AUTH_URL" in r.getMessage() for r in warnings), logs.text()


def test_keys_are_fetched_at_start_and_readyz_reports_them(
    settings: Settings, database: Database
) -> None:
    key = generate_key("EdDSA")
    with JwksServer([key]) as jwks:
        configured = settings.model_copy(update={"better_auth_url": jwks.origin})
        with TestClient(create_app(configured, database)) as client:
            assert jwks.request_count == 1  # before any request
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["keys"] == "ok"


def test_unreachable_keys_at_start_are_a_warning_and_readyz_says_so(
    settings: Settings, database: Database
) -> None:
    origin = f"http://127.0.0.1:{free_port()}"
    configured = settings.model_copy(update={"better_auth_url": origin})
    with captured("service.app") as logs, TestClient(create_app(configured, database)) as client:
        resp = client.get("/readyz")
        problem_type(resp, 503, ProblemType.unavailable)
        assert "keys" in resp.json()["detail"]
        assert resp.headers["Retry-After"]
        assert client.get("/healthz").status_code == 200  # started: not a crash
    warnings = [r for r in logs.records if r.levelno == logging.WARNING]
    assert any(origin in r.getMessage() for r in warnings), logs.text()


def test_hs256_only_readyz_does_not_mention_keys(client: TestClient) -> None:
    assert client.get("/readyz").json()["keys"] == "not used"


@pytest.mark.parametrize("claim", ["iss", "aud"])
def test_issuer_or_audience_mismatch_logs_expected_and_received(
    settings: Settings, database: Database, claim: str
) -> None:
    key = generate_key("EdDSA")
    with JwksServer([key]) as jwks:
        configured = settings.model_copy(update={"better_auth_url": jwks.origin})
        user_id = random_id()
        claims = better_auth_claims(jwks.origin, user_id=user_id)
        received = "http://localhost:3999"
        claims[claim] = received
        token = key.sign(claims)
        with (
            captured("service.auth") as logs,
            TestClient(create_app(configured, database)) as client,
        ):
            resp = client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})
    problem_type(resp, 401, ProblemType.token_invalid)
    mismatch = [r for r in logs.records if "mismatch" in r.getMessage()]
    assert mismatch and all(r.levelno == logging.WARNING for r in mismatch), logs.text()
    message = mismatch[0].getMessage()
    assert jwks.origin in message and received in message
    assert token not in logs.text()
    assert token.split(".")[2] not in logs.text()


# URLs the API hands out -----------------------------------------------------------------


def _followable(value: str) -> str:
    """A URL as a header may carry it: printable ASCII, no spaces."""
    assert re.fullmatch(r"[!-~]+", value), value
    return value


def _link(resp: httpx.Response, rel: str) -> str:
    url = link_url(resp, rel)
    assert url is not None, resp.headers
    return _followable(url)


@pytest.mark.parametrize("user_id", ["dan smith", "\u00fc-user", "a?b#c%&d"])
def test_every_url_handed_out_can_be_followed_whatever_the_user_id(
    live_server: LiveServer, user_id: str
) -> None:
    """Location, Link and stream_url percent-encode the user id: Starlette would put its space,
    `?`, `#`, `%` or non-ASCII characters into the URL as they are."""
    token = create_dev_token(TEST_SECRET, user_id, email="odd@example.com", name="Odd")
    user = ApiUser(quote(user_id, safe=""), token)
    with live_server.client(headers=user.headers) as http:
        first = create_task(http, user, "first")
        created = http.post(user.url(), json={"title": "second"})
        location = _followable(created.headers["Location"])
        assert http.get(location).json()["id"] == created.json()["id"]

        page = http.get(user.url(), params={"limit": 1, "sort": "created_at", "order": "asc"})
        assert [t["id"] for t in page.json()] == [first["id"]]
        following = http.get(_link(page, "next"))
        assert [t["id"] for t in following.json()] == [created.json()["id"]]

        series = create_task(
            http, user, "weekly", due_at="2027-03-01T07:00:00Z", recurrence="FREQ=WEEKLY"
        )
        done = http.patch(user.url(f"/{series['id']}/complete"))
        assert http.get(_link(done, "next-occurrence")).json()["id"] == done.json()["next_task_id"]

        for title in ("r1", "r2"):
            create_task(
                http, user, title, due_at="2027-03-01T07:00:00Z", remind_at="2027-03-01T06:00:00Z"
            )
        reminders = http.get(f"/api/{user.user_id}/reminders", params={"limit": 1})
        assert len(http.get(_link(reminders, "next")).json()) == 1

        tag = http.post(f"/api/{user.user_id}/tags", json={"name": "work"})
        assert http.get(_followable(tag.headers["Location"])).json() == tag.json()

        ticket = http.post(f"/api/{user.user_id}/events/tickets").json()
        with FeedReader(live_server.url, ticket["stream_url"]) as reader:
            assert reader.status == 200, reader.body
