"""Authentication and ownership through the HTTP API, with tokens signed by real keys.

HS256 tokens use the test secret; EdDSA/ES256/RS256 tokens are checked against a JWKS that a
local HTTP server serves, with BETTER_AUTH_URL set to its origin (so `iss` = `aud` = origin).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.database import Database
from service.settings import Settings
from tests.jwt_helpers import (
    JwksServer,
    SigningKey,
    b64url,
    better_auth_claims,
    generate_key,
    hmac_token,
    random_id,
    sign_hs256,
    unsigned_token,
)
from tests.serve_helpers import ServeProcess
from tests.support import (
    TEST_SECRET,
    WWW_AUTHENTICATE,
    WWW_AUTHENTICATE_NO_TOKEN,
    MakeUser,
    assert_problem,
    bearer,
    create_task,
    free_port,
    jwks_app,
)


def user_exists(database: Database, user_id: str) -> bool:
    with database.engine.connect() as conn:
        query = sa.text("SELECT 1 FROM users WHERE id = :id")
        return conn.execute(query, {"id": user_id}).first() is not None


# Accepted tokens ----------------------------------------------------------------------


def test_hs256_token_signed_with_the_secret(client: TestClient, settings: Settings) -> None:
    assert settings.better_auth_secret is not None
    user_id = random_id()
    now = int(time.time())
    token = sign_hs256(
        {"sub": user_id, "iat": now, "exp": now + 300},
        settings.better_auth_secret.get_secret_value(),
    )
    resp = client.post(f"/api/{user_id}/tasks", json={"title": "hs"}, headers=bearer(token))
    assert resp.status_code == 201
    assert client.get(f"/api/{user_id}/tasks", headers=bearer(token)).json()[0]["title"] == "hs"


def test_a_token_for_the_services_own_actor_is_401(
    client: TestClient, settings: Settings, database: Database
) -> None:
    """`system:reminders` marks the events the service writes: a user of that id could write
    events that read as the service's."""
    assert settings.better_auth_secret is not None
    actor = settings.reminder_actor_id
    now = int(time.time())
    token = sign_hs256(
        {"sub": actor, "iat": now, "exp": now + 300},
        settings.better_auth_secret.get_secret_value(),
    )
    resp = client.post(
        f"/api/{actor}/tasks", json={"title": "as the service"}, headers=bearer(token)
    )
    assert assert_problem(resp, 401)["type"].endswith("/token-invalid")
    assert not user_exists(database, actor)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_jwks_token_for_each_algorithm(alg: str, settings: Settings, database: Database) -> None:
    """A Better-Auth-shaped token is accepted, and its claims provision the user."""
    key = generate_key(alg)
    with jwks_app(settings, database, key) as (client, jwks):
        user_id = random_id()
        token = key.sign(
            better_auth_claims(jwks.origin, user_id=user_id, email="j@example.com", name="J")
        )
        created = client.post(f"/api/{user_id}/tasks", json={"title": alg}, headers=bearer(token))
        assert created.status_code == 201
        listed = client.get(f"/api/{user_id}/tasks", headers=bearer(token))
        assert [t["title"] for t in listed.json()] == [alg]
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": user_id}
        ).one()
    assert tuple(row) == ("j@example.com", "J")


def test_key_rotation_new_kid_is_accepted(settings: Settings, database: Database) -> None:
    old, new = generate_key("EdDSA"), generate_key("EdDSA")
    with jwks_app(settings, database, old) as (client, jwks):
        user_id = random_id()
        claims = better_auth_claims(jwks.origin, user_id=user_id)
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(old.sign(claims))).is_success
        fetches = jwks.request_count

        # Better Auth rotates: the set now holds both keys and new tokens carry the new kid.
        jwks.set_keys(old, new)
        resp = client.get(f"/api/{user_id}/tasks", headers=bearer(new.sign(claims)))
        assert resp.status_code == 200
        assert jwks.request_count == fetches + 1
        still_old = better_auth_claims(jwks.origin, user_id=user_id, ttl=600)
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(old.sign(still_old))).is_success


def test_a_withdrawn_key_is_refused_once_the_key_set_is_older_than_its_max_age(
    settings: Settings, database: Database
) -> None:
    old, new = generate_key("EdDSA"), generate_key("EdDSA")
    with jwks_app(settings, database, old, jwks_max_age_seconds=0.5) as (client, jwks):
        user_id = random_id()
        headers = bearer(old.sign(better_auth_claims(jwks.origin, user_id=user_id)))
        assert client.get(f"/api/{user_id}/tasks", headers=headers).status_code == 200
        jwks.set_keys(new)  # the old key is withdrawn
        time.sleep(0.6)
        body = assert_problem(client.get(f"/api/{user_id}/tasks", headers=headers), 401)
        assert body["type"] == "tag:todo-api,2026:problems/token-invalid"
        assert body["detail"].endswith("unknown signing key.")


def test_expired_within_leeway_is_accepted(client: TestClient) -> None:
    """Clock skew of a few seconds is tolerated (leeway, at most 60 s, 30 s by default)."""
    user_id = random_id()
    now = int(time.time())
    token = sign_hs256({"sub": user_id, "iat": now - 900, "exp": now - 10}, TEST_SECRET)
    assert client.get(f"/api/{user_id}/tasks", headers=bearer(token)).status_code == 200


# Rejected tokens: 401 -----------------------------------------------------------------


@dataclass
class Ctx:
    origin: str
    key: SigningKey
    user_id: str

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return better_auth_claims(self.origin, user_id=self.user_id, **overrides)


def _now() -> int:
    return int(time.time())


def _session_token() -> str:
    mac = hmac.new(b"k", b"v", hashlib.sha256).digest()
    return f"{random_id()}.{base64.b64encode(mac).decode()}"


# Each case gives the Authorization header value (None: no header at all).
# The cases without a bearer token at all: 401 token-missing, a challenge without error code.
NO_TOKEN_CASES = frozenset(
    {"missing", "bearer-without-token", "bearer-blank", "basic-scheme", "token-without-scheme"}
)
AUTH_CASES: dict[str, Callable[[Ctx], str | None]] = {
    "missing": lambda c: None,
    "bearer-without-token": lambda c: "Bearer",
    "bearer-blank": lambda c: "Bearer   ",
    "basic-scheme": lambda c: "Basic " + base64.b64encode(b"user:pass").decode(),
    "token-without-scheme": lambda c: c.key.sign(c.claims()),
    "not-a-jwt": lambda c: "Bearer not-a-jwt",
    "garbage-segments": lambda c: "Bearer aaaa.bbbb.cccc",
    "session-token": lambda c: "Bearer " + _session_token(),
    "expired": lambda c: "Bearer " + c.key.sign(c.claims(iat=_now() - 1000, ttl=900)),
    "expired-61s-ago": lambda c: "Bearer " + c.key.sign(c.claims(iat=_now() - 961, ttl=900)),
    "nbf-in-future": lambda c: "Bearer " + c.key.sign(c.claims(nbf=_now() + 600)),
    "iat-in-future": lambda c: "Bearer " + c.key.sign(c.claims(iat=_now() + 600)),
    "bad-signature": lambda c: "Bearer " + generate_key("EdDSA", kid=c.key.kid).sign(c.claims()),
    "tampered-payload": lambda c: "Bearer " + _tamper(c.key.sign(c.claims()), c.claims()),
    "wrong-issuer": lambda c: "Bearer " + c.key.sign(c.claims(iss="https://evil.example")),
    "wrong-audience": lambda c: "Bearer " + c.key.sign(c.claims(aud="https://other.example")),
    "session-cache-audience": lambda c: (
        "Bearer " + c.key.sign(c.claims(aud="better-auth:session-cache"))
    ),
    "missing-exp": lambda c: "Bearer " + c.key.sign(c.claims(exp=None)),
    "missing-sub": lambda c: "Bearer " + c.key.sign(c.claims(sub=None)),
    # No `{user_id}` can hold a control character (a 403 for the URL's user before).
    "control-character-in-sub": lambda c: "Bearer " + c.key.sign(c.claims(sub=c.user_id + "\x85")),
    "alg-none": lambda c: "Bearer " + unsigned_token({"alg": "none", "typ": "JWT"}, c.claims()),
    "hs256-signed-with-public-key": lambda c: (
        "Bearer "
        + hmac_token(
            {"alg": "HS256", "typ": "JWT", "kid": c.key.kid}, c.claims(), c.key.public_pem()
        )
    ),
    "unknown-kid": lambda c: "Bearer " + generate_key("EdDSA").sign(c.claims()),
    "hs256-wrong-secret": lambda c: (
        "Bearer "
        + sign_hs256({"sub": c.user_id, "exp": _now() + 300}, "another-secret-" + "x" * 40)
    ),
    "hs256-expired": lambda c: (
        "Bearer " + sign_hs256({"sub": c.user_id, "exp": _now() - 120}, TEST_SECRET)
    ),
    "hs256-missing-exp": lambda c: "Bearer " + sign_hs256({"sub": c.user_id}, TEST_SECRET),
    "hs256-missing-sub": lambda c: "Bearer " + sign_hs256({"exp": _now() + 300}, TEST_SECRET),
    "hs256-control-character-in-sub": lambda c: (
        "Bearer " + sign_hs256({"sub": c.user_id + "\x85", "exp": _now() + 300}, TEST_SECRET)
    ),
}


def _tamper(token: str, claims: dict[str, Any]) -> str:
    """The same signature over a payload naming another user."""
    header, _, signature = token.split(".")
    return f"{header}.{b64url({**claims, 'name': 'Mallory'})}.{signature}"


@pytest.fixture(scope="module")
def module_key() -> SigningKey:
    return generate_key("EdDSA")


@pytest.fixture
def jwks_client(
    settings: Settings, database: Database, module_key: SigningKey
) -> Iterator[tuple[TestClient, JwksServer]]:
    with jwks_app(settings, database, module_key) as pair:
        yield pair


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_bad_credentials_are_401(
    case: str,
    jwks_client: tuple[TestClient, JwksServer],
    module_key: SigningKey,
    database: Database,
) -> None:
    """401 + WWW-Authenticate + problem+json, never echoing the token; no user row made."""
    client, jwks = jwks_client
    ctx = Ctx(jwks.origin, module_key, random_id())
    authorization = AUTH_CASES[case](ctx)
    headers = {"Authorization": authorization} if authorization is not None else {}
    for method, path, body in (
        ("GET", "", None),
        ("POST", "", {"title": "x"}),
        ("PATCH", "/1/complete", None),
    ):
        resp = client.request(method, f"/api/{ctx.user_id}/tasks{path}", json=body, headers=headers)
        problem = assert_problem(resp, 401)
        if case in NO_TOKEN_CASES:
            assert problem["type"].endswith("/token-missing")
            assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE_NO_TOKEN
        else:
            assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE
        if authorization:
            credentials = authorization.split(" ")[-1]
            if len(credentials) > 8:
                assert credentials not in resp.text
                for segment in credentials.split("."):
                    assert len(segment) < 8 or segment not in resp.text
    assert not user_exists(database, ctx.user_id)


def test_hs256_with_public_key_in_jwks_only_mode_is_401(
    settings: Settings, database: Database
) -> None:
    """With no shared secret configured, HS256 is simply not an accepted algorithm."""
    key = generate_key("RS256")
    with jwks_app(settings, database, key, better_auth_secret=None) as (client, jwks):
        user_id = random_id()
        claims = better_auth_claims(jwks.origin, user_id=user_id)
        forged = hmac_token({"alg": "HS256", "typ": "JWT"}, claims, key.public_pem())
        resp = client.get(f"/api/{user_id}/tasks", headers=bearer(forged))
        assert_problem(resp, 401)
        assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(key.sign(claims))).is_success


# JWKS outage: 503, never 500 ----------------------------------------------------------


@pytest.mark.parametrize(("status", "body"), [(503, b"down"), (500, b"<html>"), (200, b"not json")])
def test_jwks_outage_without_cached_key_is_503(
    status: int, body: bytes, settings: Settings, database: Database
) -> None:
    key = generate_key("EdDSA")
    # No key at start-up, so none is cached when the key server breaks.
    with jwks_app(settings, database) as (client, jwks):
        jwks.respond(status, body)
        user_id = random_id()
        token = key.sign(better_auth_claims(jwks.origin, user_id=user_id))
        resp = client.get(f"/api/{user_id}/tasks", headers=bearer(token))
        assert_problem(resp, 503)
        assert resp.headers["Retry-After"]
        assert token not in resp.text

        jwks.set_keys(key)  # recovered: the same token now works
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(token)).status_code == 200


def test_a_jwks_outage_503_says_when_the_keys_are_fetched_again(
    settings: Settings, database: Database
) -> None:
    """Not a fixed 2 s: a retry before JWKS_MIN_REFETCH_SECONDS have passed since the failed
    fetch cannot succeed, on the API as on /readyz."""
    key = generate_key("EdDSA")
    origin = f"http://127.0.0.1:{free_port()}"  # nothing listens: the start-up fetch fails
    changes = {"better_auth_url": origin, "jwks_min_refetch_seconds": 600}
    app = create_app(settings.model_copy(update=changes), database)
    with TestClient(app, raise_server_exceptions=False) as client:
        user_id = random_id()
        token = key.sign(better_auth_claims(origin, user_id=user_id))
        for resp in (
            client.get(f"/api/{user_id}/tasks", headers=bearer(token)),
            client.get("/readyz"),
        ):
            assert_problem(resp, 503)
            # The start-up fetch failed moments ago: most of the 600 s are still to wait.
            assert 300 < int(resp.headers["Retry-After"]) <= 600


def test_jwks_url_credentials_are_sent_but_never_logged(database_url: str, tmp_path: Path) -> None:
    """`todo-api serve`'s own log: the start-up INFO line, the failed-fetch WARNING and
    httpx's request lines show the JWKS URL without its password."""
    key = generate_key("EdDSA")
    with JwksServer([key]) as jwks:
        url = jwks.url.replace("http://", "http://svc:JwksPw123@")
        env = {
            "DATABASE_URL": database_url,
            "BETTER_AUTH_URL": jwks.origin,
            "BETTER_AUTH_JWKS_URL": url,
            "JWKS_MIN_REFETCH_SECONDS": "0",
        }
        server = ServeProcess(tmp_path, env).start()
        try:
            jwks.respond(500, b"down")
            user_id = random_id()
            unknown = generate_key("EdDSA").sign(better_auth_claims(jwks.origin, user_id=user_id))
            resp = httpx.get(f"{server.url}/api/{user_id}/tasks", headers=bearer(unknown))
            assert_problem(resp, 503)
        finally:
            server.stop()
    log = server.log.read_text()
    assert "JwksPw123" not in log
    shown = f"http://svc:***@127.0.0.1:{jwks.url.split(':')[2]}"
    assert f"token signing keys fetched from {shown}" in log
    assert f"JWKS fetch from {shown}" in log
    assert f"HTTP Request: GET {jwks.url}" in log  # httpx's line, without the credentials
    basic = "Basic " + base64.b64encode(b"svc:JwksPw123").decode()
    assert jwks.authorizations == [basic, basic]


def test_unreachable_jwks_is_503(settings: Settings, database: Database) -> None:
    key = generate_key("EdDSA")
    origin = f"http://127.0.0.1:{free_port()}"
    app = create_app(settings.model_copy(update={"better_auth_url": origin}), database)
    with TestClient(app, raise_server_exceptions=False) as client:
        user_id = random_id()
        token = key.sign(better_auth_claims(origin, user_id=user_id))
        assert_problem(client.get(f"/api/{user_id}/tasks", headers=bearer(token)), 503)
        # HS256 tokens do not depend on the key server.
        hs = sign_hs256({"sub": user_id, "exp": _now() + 60}, TEST_SECRET)
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(hs)).status_code == 200


def test_jwks_outage_with_cached_key_keeps_working(settings: Settings, database: Database) -> None:
    key = generate_key("ES256")
    with jwks_app(settings, database, key) as (client, jwks):
        first = random_id()
        token = key.sign(better_auth_claims(jwks.origin, user_id=first))
        assert client.get(f"/api/{first}/tasks", headers=bearer(token)).status_code == 200
        jwks.respond(500, b"down")
        second = random_id()
        token = key.sign(better_auth_claims(jwks.origin, user_id=second))
        assert client.get(f"/api/{second}/tasks", headers=bearer(token)).status_code == 200


# Ownership ----------------------------------------------------------------------------


def _all_methods(task_id: int | str) -> list[tuple[str, str, Any]]:
    return [
        ("GET", f"/{task_id}", None),
        ("PUT", f"/{task_id}", {"title": "hijacked"}),
        ("PATCH", f"/{task_id}/complete", None),
        ("PATCH", f"/{task_id}/complete", {"completed": True}),
        ("DELETE", f"/{task_id}", None),
    ]


def test_other_users_task_is_indistinguishable_from_a_missing_one(
    client: TestClient, make_user: MakeUser
) -> None:
    """B, on B's own URL, asking for A's task id gets exactly what a missing id gets."""
    alice, bob = make_user(), make_user()
    task = create_task(client, alice, "alice's", description="private")
    missing_id = task["id"] + 10_000_000

    for (method, path, body), (_, missing_path, _) in zip(
        _all_methods(task["id"]), _all_methods(missing_id), strict=True
    ):
        foreign = client.request(method, bob.url(path), json=body, headers=bob.headers)
        missing = client.request(method, bob.url(missing_path), json=body, headers=bob.headers)
        foreign_body = assert_problem(foreign, 404)
        missing_body = assert_problem(missing, 404)
        assert set(foreign_body) == set(missing_body)
        normalized = foreign_body["detail"].replace(str(task["id"]), "ID")
        assert normalized == missing_body["detail"].replace(str(missing_id), "ID")
        assert {k: v for k, v in foreign_body.items() if k != "detail"} == {
            k: v for k, v in missing_body.items() if k != "detail"
        }
        assert "alice" not in foreign.text and "private" not in foreign.text

    assert client.get(bob.url(), headers=bob.headers).json() == []
    assert client.get(alice.url(f"/{task['id']}"), headers=alice.headers).json() == task


def test_token_for_another_user_id_is_403_on_every_method(
    client: TestClient, make_user: MakeUser
) -> None:
    alice, bob = make_user(), make_user()
    task = create_task(client, alice, "alice's")
    requests: list[tuple[str, str, Any]] = [
        ("GET", "", None),
        ("POST", "", {"title": "planted"}),
        *_all_methods(task["id"]),
    ]
    for method, path, body in requests:
        resp = client.request(method, alice.url(path), json=body, headers=bob.headers)
        assert_problem(resp, 403)
        assert bob.token not in resp.text
    listed = client.get(alice.url(), headers=alice.headers).json()
    assert listed == [task]


def test_403_does_not_depend_on_the_task_existing(client: TestClient, make_user: MakeUser) -> None:
    """A foreign URL answers 403 before any lookup, so it cannot probe for task ids."""
    alice, bob = make_user(), make_user()
    resp: httpx.Response = client.get(alice.url("/999999999"), headers=bob.headers)
    assert_problem(resp, 403)
