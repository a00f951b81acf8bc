"""Rate limits: per user and per client IP, in memory and shared through this machine's Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from pydantic import SecretStr, ValidationError

from service.app import create_app
from service.database import Database
from service.ratelimit import SweptMemoryStorage
from service.settings import Settings
from tests.jwt_helpers import sign_hs256
from tests.serve_helpers import ServeProcess
from tests.support import (
    TEST_SECRET,
    WWW_AUTHENTICATE_NO_TOKEN,
    ApiUser,
    EmbeddedRedis,
    assert_problem,
    assert_validation_error,
    free_port,
    redis_url,
)


def _client(settings: Settings, database: Database, **limits: object) -> TestClient:
    app = create_app(settings.model_copy(update=limits), database)
    return TestClient(app, raise_server_exceptions=False)


def _assert_rate_limited(response, category: str, limit: int, window: int) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 429
    assert body["type"] == "tag:todo-api,2026:problems/rate-limited"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= window
    assert response.headers["RateLimit-Policy"] == f'"{category}";q={limit};w={window}'
    assert response.headers["RateLimit"].startswith(f'"{category}";r=0;t=')


def test_writes_over_the_user_limit_are_429_with_retry_after_and_ratelimit_headers(
    settings: Settings, database: Database, make_user
) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_user(), make_user()
    with _client(settings, database, rate_limit_write="3/minute") as client:
        for remaining in (2, 1, 0):
            created = client.post(alice.url(), json={"title": "t"}, headers=alice.headers)
            assert created.status_code == 201
            assert created.headers["RateLimit-Policy"] == '"write";q=3;w=60'
            assert created.headers["RateLimit"].startswith(f'"write";r={remaining};t=')
        refused = client.post(alice.url(), json={"title": "t"}, headers=alice.headers)
        _assert_rate_limited(refused, "write", 3, 60)
        # Nothing was written by the refused request.
        listed = client.get(alice.url(), headers=alice.headers)
        assert listed.status_code == 200 and len(listed.json()) == 3
        # Reads have their own budget, and other users theirs.
        assert listed.headers["RateLimit-Policy"].startswith('"read";')
        assert client.post(bob.url(), json={"title": "t"}, headers=bob.headers).status_code == 201


def test_expensive_operations_have_a_stricter_limit(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with _client(settings, database, rate_limit_expensive="2/minute") as client:
        created = client.post(user.url(), json={"title": "t", "tags": ["a"]}, headers=user.headers)
        task_id = created.json()["id"]
        [tag] = client.get(f"/api/{user.user_id}/tags", headers=user.headers).json()
        tag_url = f"/api/{user.user_id}/tags/{tag['id']}"
        verify = f"/api/{user.user_id}/audit-events/verify"
        history = user.url(f"/{task_id}/history")
        assert client.get(verify, headers=user.headers).status_code == 200
        assert client.get(history, headers=user.headers).status_code == 200
        _assert_rate_limited(client.get(verify, headers=user.headers), "expensive", 2, 60)
        _assert_rate_limited(client.get(history, headers=user.headers), "expensive", 2, 60)
        # A tag's rename and delete write one audit event per task carrying it.
        renamed = client.patch(tag_url, json={"name": "b"}, headers=user.headers)
        _assert_rate_limited(renamed, "expensive", 2, 60)
        _assert_rate_limited(client.delete(tag_url, headers=user.headers), "expensive", 2, 60)
        # Plain reads and writes are not expensive.
        assert client.get(user.url(), headers=user.headers).status_code == 200
        assert client.get(tag_url, headers=user.headers).json()["name"] == "a"
        assert client.post(user.url(), json={"title": "t"}, headers=user.headers).status_code == 201


def test_renaming_or_deleting_a_tag_counts_against_the_expensive_limit_not_the_write_one(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """One rename or delete records a `task.updated` event for every task carrying the tag
    (thousands of permanent rows for a tag on thousands of tasks): not one plain write."""
    tags = f"/api/{user.user_id}/tags"
    limits = {"rate_limit_expensive": "2/minute", "rate_limit_write": "6/minute"}
    with _client(settings, database, **limits) as client:
        for name in ("a", "b", "c"):
            assert client.post(tags, json={"name": name}, headers=user.headers).status_code == 201
        created = client.post(
            user.url(), json={"title": "t", "tags": ["a", "b", "c"]}, headers=user.headers
        )
        assert created.status_code == 201
        ids = {t["name"]: t["id"] for t in client.get(tags, headers=user.headers).json()}
        # A change of case only, and a delete: both expensive, whatever they end up changing.
        renamed = client.patch(f"{tags}/{ids['a']}", json={"name": "A"}, headers=user.headers)
        assert renamed.status_code == 200, renamed.text
        assert renamed.headers["RateLimit-Policy"] == '"expensive";q=2;w=60'
        assert renamed.headers["RateLimit"].startswith('"expensive";r=1;t=')
        deleted = client.delete(f"{tags}/{ids['b']}", headers=user.headers)
        assert deleted.status_code == 204
        assert deleted.headers["RateLimit"].startswith('"expensive";r=0;t=')
        refused = client.patch(f"{tags}/{ids['c']}", json={"name": "d"}, headers=user.headers)
        _assert_rate_limited(refused, "expensive", 2, 60)
        _assert_rate_limited(
            client.delete(f"{tags}/{ids['c']}", headers=user.headers), "expensive", 2, 60
        )
        # Neither refused request changed anything.
        assert client.get(f"{tags}/{ids['c']}", headers=user.headers).json()["name"] == "c"
        task = client.get(user.url(f"/{created.json()['id']}"), headers=user.headers).json()
        assert sorted(task["tags"]) == ["A", "c"]
        # The write budget is untouched by them: 4 of 6 spent, 2 left.
        for remaining in (1, 0):
            written = client.post(user.url(), json={"title": "t"}, headers=user.headers)
            assert written.status_code == 201
            assert written.headers["RateLimit"].startswith(f'"write";r={remaining};t=')
        _assert_rate_limited(
            client.post(user.url(), json={"title": "t"}, headers=user.headers), "write", 6, 60
        )


def test_unauthenticated_requests_are_limited_per_client_ip(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with _client(settings, database, rate_limit_anonymous="2/minute") as client:
        assert client.get(user.url()).status_code == 401
        bad = {"Authorization": "Bearer not-a-token"}
        assert client.get(user.url(), headers=bad).status_code == 401
        _assert_rate_limited(client.get(user.url(), headers=bad), "anonymous", 2, 60)
        # A valid token is counted by its user, not by the address.
        assert client.get(user.url(), headers=user.headers).status_code == 200


def test_an_ipv6_client_is_counted_by_its_64_network_not_each_address(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """One IPv6 host is handed a whole /64 (2^64 addresses) and may send from any of them:
    counted per address, it would never reach the anonymous limit. IPv4 stays per address."""
    limited = {"rate_limit_anonymous": "2/minute", "trusted_proxies": ["*"]}
    with _client(settings, database, **limited) as client:
        bad = {"Authorization": "Bearer not-a-token"}
        for address in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"):
            headers = {**bad, "X-Forwarded-For": address}
            assert client.get(user.url(), headers=headers).status_code == 401
        third = {**bad, "X-Forwarded-For": "2001:db8:1:2:abcd:ef01:2345:6789"}
        _assert_rate_limited(client.get(user.url(), headers=third), "anonymous", 2, 60)
        # Another /64, and IPv4 addresses side by side, each have their own count.
        other = {**bad, "X-Forwarded-For": "2001:db8:1:3::1"}
        assert client.get(user.url(), headers=other).status_code == 401
        for address in ("192.0.2.1", "192.0.2.2", "::ffff:192.0.2.3"):
            headers = {**bad, "X-Forwarded-For": address}
            assert client.get(user.url(), headers=headers).status_code == 401


def test_a_malformed_user_id_without_a_token_is_a_401_counted_by_address(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """Authentication comes before the path: a caller without a valid token learns 401, not
    which user ids are well formed, and cannot dodge the anonymous limit by malforming them."""
    with _client(settings, database, rate_limit_anonymous="2/minute") as client:
        for path in ("/api/a%00b/tasks", f"/api/{'x' * 129}/tasks"):
            resp = client.get(path)
            assert_problem(resp, 401)
            assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE_NO_TOKEN
        _assert_rate_limited(client.get("/api/%20/tasks/1"), "anonymous", 2, 60)
        # With a valid token the same path is the request's own mistake: 400 on it.
        assert_validation_error(
            client.get("/api/a%00b/tasks", headers=user.headers), "path.user_id"
        )


def test_an_expired_token_is_told_to_refresh_even_past_the_anonymous_limit(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    """A frontend refreshes on 401 but backs off on 429: a genuine expired token gets its 401
    `token-expired` even when its address has spent the anonymous budget (one server of a
    Next.js app calls for all its users from one address)."""
    assert settings.better_auth_secret is not None
    expired = sign_hs256(
        {"sub": user.user_id, "exp": int(time.time()) - 120},
        settings.better_auth_secret.get_secret_value(),
    )
    with _client(settings, database, rate_limit_anonymous="2/minute") as client:
        bad = {"Authorization": "Bearer not-a-token"}
        assert client.get(user.url(), headers=bad).status_code == 401
        assert client.get(user.url(), headers=bad).status_code == 401
        _assert_rate_limited(client.get(user.url(), headers=bad), "anonymous", 2, 60)
        for _ in range(3):
            refused = client.get(user.url(), headers={"Authorization": f"Bearer {expired}"})
            assert refused.status_code == 401, refused.text
            assert refused.json()["type"].endswith("/token-expired")


def test_rate_limit_headers_are_exposed_to_browsers(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    origin = "https://app.example.com"
    with _client(settings, database, cors_origins=[origin], rate_limit_read="1/minute") as client:
        response = client.get(user.url(), headers={**user.headers, "Origin": origin})
        exposed = {
            h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")
        }
        assert {"ratelimit", "ratelimit-policy", "retry-after"} <= exposed
        refused = client.get(user.url(), headers={**user.headers, "Origin": origin})
        assert refused.status_code == 429
        assert refused.headers["access-control-allow-origin"] == origin


def test_redis_counts_for_every_instance(
    settings: Settings, database: Database, make_user, redis_prefix: str
) -> None:  # type: ignore[no-untyped-def]
    """Two apps (two instances) with one Redis: one user's writes share one budget."""
    user = make_user()
    shared = {
        "redis_url": SecretStr(redis_url()),
        "rate_limit_key_prefix": redis_prefix,
        "rate_limit_write": "5/minute",
    }
    with (
        _client(settings, database, **shared) as first,
        _client(settings, database, **shared) as second,
    ):
        statuses = []
        for i in range(8):
            client = first if i % 2 == 0 else second
            statuses.append(
                client.post(user.url(), json={"title": f"t{i}"}, headers=user.headers).status_code
            )
        assert statuses == [201] * 5 + [429] * 3
        ready = first.get("/readyz").json()
        assert ready["rate_limit_store"] == {"backend": "redis", "status": "ok"}
    keys = redis.Redis.from_url(redis_url()).keys(f"{redis_prefix}*")
    assert keys, "the counters are in Redis, under the configured prefix"


@pytest.mark.parametrize(
    "refusal",
    [
        # A failover left the URL on a replica: READONLY to every write.
        ["REPLICAOF", "127.0.0.1", "1"],
        # Full, with the default noeviction policy: OOM to every write.
        ["CONFIG", "SET", "maxmemory", "1"],
    ],
    ids=["read-only replica", "out of memory"],
)
def test_a_redis_that_answers_ping_but_refuses_counting_is_reported_down(
    settings: Settings, database: Database, user: ApiUser, refusal: list[str]
) -> None:
    """/readyz's store status is what the limits get: a Redis that answers PING but refuses
    the counters' writes admits every request uncounted, and must not be reported `ok`."""
    server = EmbeddedRedis()
    try:
        redis.Redis.from_url(server.url).execute_command(*refusal)
        limited = {"redis_url": SecretStr(server.url), "rate_limit_read": "1/minute"}
        with _client(settings, database, **limited) as client:
            statuses = [client.get(user.url(), headers=user.headers).status_code for _ in range(3)]
            assert statuses == [200] * 3  # fail open
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["rate_limit_store"] == {"backend": "redis", "status": "down"}
    finally:
        server.stop()


def test_memory_store_counts_per_instance(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with (
        _client(settings, database, rate_limit_write="1/minute") as first,
        _client(settings, database, rate_limit_write="1/minute") as second,
    ):
        assert first.post(user.url(), json={"title": "a"}, headers=user.headers).status_code == 201
        assert second.post(user.url(), json={"title": "b"}, headers=user.headers).status_code == 201
        assert first.get("/readyz").json()["rate_limit_store"]["backend"] == "memory"


def test_redis_down_fails_open_with_a_warning(
    settings: Settings, database: Database, user: ApiUser, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    caplog.set_level(logging.WARNING, logger="service.ratelimit")
    with _client(
        settings, database, redis_url=SecretStr(dead), rate_limit_write="1/minute"
    ) as client:
        for i in range(3):
            created = client.post(user.url(), json={"title": f"t{i}"}, headers=user.headers)
            assert created.status_code == 201  # over the limit, but the counter is unreachable
            assert "RateLimit" not in created.headers
        ready = client.get("/readyz")
        assert ready.status_code == 200  # the API still works, so it is still ready
        assert ready.json()["rate_limit_store"] == {"backend": "redis", "status": "down"}
    warnings = [r for r in caplog.records if r.name == "service.ratelimit"]
    assert warnings and "fail open" in warnings[0].getMessage()
    assert dead.split("//")[1] not in warnings[0].getMessage()


def test_disabled_limits_count_nothing(
    settings: Settings, database: Database, user: ApiUser
) -> None:
    with _client(
        settings, database, rate_limit_enabled=False, rate_limit_write="1/minute"
    ) as client:
        for i in range(3):
            created = client.post(user.url(), json={"title": f"t{i}"}, headers=user.headers)
            assert created.status_code == 201
            assert "RateLimit" not in created.headers


@pytest.mark.parametrize("value", ["fast", "10/fortnight", "", "-1/minute"])
def test_invalid_rate_settings_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, rate_limit_write=value)  # type: ignore[call-arg]


def test_redis_url_must_be_redis() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, redis_url="http://127.0.0.1:6379")  # type: ignore[call-arg]


def test_openapi_documents_429_on_api_routes(app: FastAPI) -> None:
    schema = app.openapi()
    create = schema["paths"]["/api/{user_id}/tasks"]["post"]["responses"]
    assert "429" in create
    assert "429" not in schema["paths"]["/healthz"]["get"]["responses"]


def test_the_change_feed_counts_requests_without_a_valid_token_per_client_ip(
    settings: Settings, database: Database, user: ApiUser, make_user: Any
) -> None:
    """No credentials, a made-up stream ticket, or another user's: each counts against the
    address, as on every other route (and each ticket tried is a database lookup)."""
    other = make_user()
    with _client(settings, database, rate_limit_anonymous="3/minute") as client:
        stream = f"/api/{user.user_id}/events"
        ticket = client.post(f"/api/{other.user_id}/events/tickets", headers=other.headers)
        assert client.get(stream).status_code == 401
        assert client.get(stream, params={"ticket": "x" * 43}).status_code == 401
        assert client.get(stream, params={"ticket": ticket.json()["ticket"]}).status_code == 403
        _assert_rate_limited(client.get(stream, params={"ticket": "y" * 43}), "anonymous", 3, 60)


def test_the_memory_store_sweeps_expired_windows_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Expired windows are dropped, so the store holds one window's clients, by a sweep that
    hops no thread (upstream's sent every key through `asyncio.to_thread`: about 0.8 s of CPU
    per sweep with 30,000 clients, one sweep after another while requests came in)."""
    hops = 0
    to_thread = asyncio.to_thread

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await to_thread(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)

    async def scenario() -> tuple[int, int]:
        storage = SweptMemoryStorage()
        strategy = MovingWindowRateLimiter(storage)
        item = parse("5/second")
        for client in range(2_000):
            assert await strategy.hit(item, f"client-{client}")
        held = len(storage.events)
        await asyncio.sleep(SweptMemoryStorage.SWEEP_SECONDS + 0.2)  # the windows end
        assert await strategy.hit(item, "one-more")
        await asyncio.sleep(0.5)  # room for a sweep run as a task, as upstream's is
        return held, len(storage.events)

    held, left = asyncio.run(scenario())
    assert (held, left) == (2_000, 1)
    assert hops == 0


@pytest.mark.parametrize(("workers", "shared"), [(1, False), (2, False), (2, True)])
def test_serve_warns_that_several_workers_count_alone_without_redis(
    database_url: str, tmp_path: Path, workers: int, shared: bool, redis_prefix: str
) -> None:
    """In memory each worker counts alone: the image's `--workers 2` admits twice the limits in
    one container, and a client's `RateLimit` headers jump between the workers' counts."""
    env = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": TEST_SECRET}
    if shared:
        env |= {"REDIS_URL": redis_url(), "RATE_LIMIT_KEY_PREFIX": redis_prefix}
    server = ServeProcess(tmp_path, env, workers=workers).start()
    server.stop()
    warnings = [
        line
        for line in server.log.read_text().splitlines()
        if "each worker counts the rate limits alone" in line
    ]
    if workers == 1 or shared:
        assert warnings == []
    else:
        [line] = warnings
        assert "--workers 2 without REDIS_URL" in line
