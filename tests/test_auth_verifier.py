"""TokenVerifier against real keys and a real JWKS endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest

from service.auth import MAX_TOKEN_LENGTH, Principal, TokenVerifier, create_dev_token
from service.exceptions import AuthError, AuthUnavailable
from service.settings import ConfigError, Settings
from tests.jwt_helpers import (
    JWKS_ALGORITHMS,
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

ORIGIN = "http://127.0.0.1:3000"
SECRET = "test-secret-" + "x" * 40


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: generate_key(alg) for alg in JWKS_ALGORITHMS}


@pytest.fixture
def ed_key(keys: dict[str, SigningKey]) -> SigningKey:
    return keys["EdDSA"]


@pytest.fixture
def server(ed_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([ed_key]) as jwks:
        yield jwks


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeVerifier = Callable[..., TokenVerifier]


@pytest.fixture
def make_verifier(server: JwksServer, clock: FakeClock) -> MakeVerifier:
    def make(**overrides: Any) -> TokenVerifier:
        options: dict[str, Any] = {
            "hs256_secret": SECRET,
            "jwks_url": server.url,
            "issuer": ORIGIN,
            "audience": ORIGIN,
            "jwks_min_refetch_seconds": 30.0,
            "jwks_timeout_seconds": 2.0,
            "clock": clock,
        }
        options.update(overrides)
        return TokenVerifier(**options)

    return make


@pytest.fixture
def verifier(make_verifier: MakeVerifier) -> TokenVerifier:
    return make_verifier()


def reject(verifier: TokenVerifier, token: Any, match: str | None = None) -> AuthError:
    with pytest.raises(AuthError, match=match) as info:
        verifier.verify(token)
    message = str(info.value)
    assert SECRET not in message
    if isinstance(token, str) and len(token) > 3:
        assert token not in message
    return info.value


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/auth/jwks"


# Accepted tokens -----------------------------------------------------------


@pytest.mark.parametrize("alg", JWKS_ALGORITHMS)
def test_accepts_better_auth_token_for_each_algorithm(
    alg: str, keys: dict[str, SigningKey], server: JwksServer, make_verifier: MakeVerifier
) -> None:
    key = keys[alg]
    server.set_keys(*keys.values())
    user_id = random_id()
    claims = better_auth_claims(ORIGIN, user_id=user_id, email="a@example.com", name="Ann")
    token = key.sign(claims)
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": key.kid}

    principal = make_verifier().verify(token)

    assert principal == Principal(
        user_id=user_id, email="a@example.com", name="Ann", expires_at=claims["exp"]
    )
    assert server.request_count == 1


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_jwk_without_alg_is_matched_by_key_type(
    alg: str, keys: dict[str, SigningKey], server: JwksServer, verifier: TokenVerifier
) -> None:
    key = keys[alg]
    server.set_keys(key.public_jwk(with_alg=False))
    assert verifier.verify(key.sign(better_auth_claims(ORIGIN))).user_id


def test_accepts_hs256_with_shared_secret(verifier: TokenVerifier, server: JwksServer) -> None:
    now = int(time.time())
    token = sign_hs256({"sub": "user-1", "email": "u@example.com", "exp": now + 60}, SECRET)
    principal = verifier.verify(token)
    assert principal == Principal("user-1", "u@example.com", None, now + 60)
    assert server.request_count == 0


@pytest.mark.parametrize(
    ("iat", "issued_at"), [(None, None), (-(10**30), 0), (1_700_000_000.9, 1_700_000_000)]
)
def test_issued_at_is_the_iat_as_a_bigint_can_hold_it(
    iat: float | None, issued_at: int | None, verifier: TokenVerifier
) -> None:
    """What orders two tokens' claims in the users row (`service/users.py`)."""
    claims: dict[str, Any] = {"sub": "user-1", "exp": int(time.time()) + 60}
    if iat is not None:
        claims["iat"] = iat
    assert verifier.verify(sign_hs256(claims, SECRET)).issued_at == issued_at


def test_dev_token_round_trip(make_verifier: MakeVerifier) -> None:
    token = create_dev_token(SECRET, "dev-user", email="d@example.com", name="Dev", ttl_seconds=60)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    principal = make_verifier(jwks_url=None).verify(token)
    assert (principal.user_id, principal.email, principal.name) == (
        "dev-user",
        "d@example.com",
        "Dev",
    )
    assert principal.expires_at - time.time() == pytest.approx(60, abs=5)


def test_hs256_checks_iss_and_aud_only_when_configured(make_verifier: MakeVerifier) -> None:
    plain = create_dev_token(SECRET, "u1")
    with_claims = create_dev_token(SECRET, "u1", issuer="api", audience="todo")

    unconfigured = make_verifier()
    assert unconfigured.verify(plain).user_id == "u1"
    assert unconfigured.verify(with_claims).user_id == "u1"

    configured = make_verifier(hs256_issuer="api", hs256_audience="todo")
    assert configured.verify(with_claims).user_id == "u1"
    reject(configured, plain, "missing claim")
    reject(configured, create_dev_token(SECRET, "u1", issuer="api", audience="x"), "audience")
    reject(configured, create_dev_token(SECRET, "u1", issuer="x", audience="todo"), "issuer")


def test_expired_within_leeway_is_accepted(ed_key: SigningKey, make_verifier: MakeVerifier) -> None:
    now = int(time.time())
    token = ed_key.sign(better_auth_claims(ORIGIN, iat=now - 910, ttl=900))  # expired 10 s ago
    assert make_verifier(leeway=30).verify(token).expires_at == now - 10
    reject(make_verifier(leeway=0), token, "expired")


def test_token_without_kid_needs_a_single_key_set(
    keys: dict[str, SigningKey], server: JwksServer, make_verifier: MakeVerifier
) -> None:
    key = keys["EdDSA"]
    token = key.sign(better_auth_claims(ORIGIN), headers={"kid": None})
    assert "kid" not in jwt.get_unverified_header(token)
    assert make_verifier().verify(token).user_id

    server.set_keys(key, keys["ES256"])
    reject(make_verifier(), token, "missing key id")


def test_unusable_keys_in_the_set_are_skipped(ed_key: SigningKey, server: JwksServer) -> None:
    server.set_keys(
        "not a key",  # type: ignore[arg-type]
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "p384"},
        {"kty": "OKP", "crv": "Ed25519", "x": "!!", "kid": "broken"},
        {"kty": "RSA", "alg": "RS512", "n": "AQAB", "e": "AQAB", "kid": "rs512"},
        {**ed_key.public_jwk(), "use": "enc", "kid": "enc-key"},
        ed_key,
    )
    verifier = TokenVerifier(hs256_secret=None, jwks_url=server.url, issuer=ORIGIN, audience=ORIGIN)
    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    # An encryption key is not a signing key, even when the signature would match.
    encryption_kid_token = ed_key.sign(better_auth_claims(ORIGIN), headers={"kid": "enc-key"})
    reject(verifier, encryption_kid_token, "unknown signing key")


# Key rotation and the JWKS fetch --------------------------------------------


def test_key_rotation_picks_up_new_kid_after_refetch_interval(
    server: JwksServer, ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30)
    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    assert server.request_count == 1

    new_key = generate_key("EdDSA")
    server.set_keys(ed_key, new_key)
    new_token = new_key.sign(better_auth_claims(ORIGIN))

    reject(verifier, new_token, "unknown signing key")  # refetch interval not over yet
    assert server.request_count == 1

    clock.advance(31)
    assert verifier.verify(new_token).user_id
    assert server.request_count == 2
    # The old key is still in the set and still works, without another fetch.
    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    assert server.request_count == 2


def test_unknown_kid_storm_fetches_at_most_once_per_interval(
    server: JwksServer, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30)
    attacker = generate_key("EdDSA")
    tokens = [
        attacker.sign(better_auth_claims(ORIGIN), headers={"kid": random_id()}) for _ in range(60)
    ]

    def attempt(token: str) -> str:
        try:
            verifier.verify(token)
        except AuthError as exc:
            return str(exc)
        return "accepted"

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(attempt, tokens))
    assert set(results) == {"unknown signing key"}
    assert server.request_count == 1

    clock.advance(10)
    assert {attempt(t) for t in tokens} == {"unknown signing key"}
    assert server.request_count == 1

    clock.advance(25)
    assert {attempt(t) for t in tokens} == {"unknown signing key"}
    assert server.request_count == 2


def test_refetch_when_clock_goes_backwards(
    server: JwksServer, ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30)
    verifier.verify(ed_key.sign(better_auth_claims(ORIGIN)))
    new_key = generate_key("EdDSA")
    server.set_keys(new_key)
    clock.advance(-3600)
    assert verifier.verify(new_key.sign(better_auth_claims(ORIGIN))).user_id
    assert server.request_count == 2


def test_empty_key_set_is_unknown_key_not_unavailable(
    server: JwksServer, ed_key: SigningKey, verifier: TokenVerifier
) -> None:
    server.set_keys()
    reject(verifier, ed_key.sign(better_auth_claims(ORIGIN)), "unknown signing key")


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        pytest.param(500, b"oops", {}, id="http-500"),
        pytest.param(404, b"{}", {}, id="http-404"),
        pytest.param(200, b"<html>not json</html>", {}, id="not-json"),
        pytest.param(200, b'{"keys": "nope"}', {}, id="keys-not-a-list"),
        pytest.param(200, b"[]", {}, id="not-an-object"),
        pytest.param(200, b'{"keys": [{"kty": "oct", "k": "AA"}]}', {}, id="no-usable-key"),
        pytest.param(200, b'{"keys": [' + b" " * 70_000 + b"]}", {}, id="too-large"),
        pytest.param(302, b"", {"Location": "http://example.com/jwks"}, id="redirect"),
    ],
)
def test_broken_jwks_endpoint_is_unavailable(
    status: int,
    body: bytes,
    headers: dict[str, str],
    server: JwksServer,
    ed_key: SigningKey,
    verifier: TokenVerifier,
) -> None:
    server.respond(status, body, headers)
    with pytest.raises(AuthUnavailable):
        verifier.verify(ed_key.sign(better_auth_claims(ORIGIN)))
    assert server.request_count == 1


def test_unreachable_jwks_endpoint_is_unavailable(
    ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_url=closed_port_url())
    token = ed_key.sign(better_auth_claims(ORIGIN))
    with pytest.raises(AuthUnavailable):
        verifier.verify(token)
    with pytest.raises(AuthUnavailable):  # within the interval: no new attempt, same answer
        verifier.verify(token)
    # HS256 tokens do not depend on the JWKS endpoint.
    assert verifier.verify(create_dev_token(SECRET, "u1")).user_id == "u1"


def test_unavailable_keys_say_when_the_next_fetch_may_be_made(
    server: JwksServer, ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    """The 503's Retry-After: a retry before the refetch interval is over meets the same
    failure without a new attempt, so sooner is useless."""
    verifier = make_verifier(jwks_min_refetch_seconds=30)
    server.respond(503, b"down")
    token = ed_key.sign(better_auth_claims(ORIGIN))
    assert verifier.keys_retry_after() == 1  # nothing fetched yet: a fetch may be made now
    with pytest.raises(AuthUnavailable) as failed:
        verifier.verify(token)
    assert failed.value.retry_after == 30
    clock.advance(12.5)
    with pytest.raises(AuthUnavailable) as failed:
        verifier.verify(token)
    assert failed.value.retry_after == 18  # 17.5 s, in whole seconds not under it
    assert server.request_count == 1
    clock.advance(17.5)
    assert verifier.keys_retry_after() == 1
    with pytest.raises(AuthUnavailable) as failed:
        verifier.verify(token)
    assert server.request_count == 2
    assert failed.value.retry_after == 30
    clock.advance(-60)  # the clock went back: the interval counts as elapsed
    assert verifier.keys_retry_after() == 1


def test_cached_keys_keep_working_while_endpoint_is_down_and_recovery(
    server: JwksServer, ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30)
    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    server.respond(503, b"down")

    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    new_key = generate_key("ES256")
    new_token = new_key.sign(better_auth_claims(ORIGIN))
    clock.advance(31)
    with pytest.raises(AuthUnavailable):  # its key may exist, but it cannot be fetched
        verifier.verify(new_token)
    assert server.request_count == 2

    server.set_keys(ed_key, new_key)
    clock.advance(31)
    assert verifier.verify(new_token).user_id
    assert server.request_count == 3


def test_a_key_removed_from_the_set_is_refused_once_the_set_is_older_than_the_max_age(
    server: JwksServer, ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30, jwks_max_age_seconds=300)
    token = ed_key.sign(better_auth_claims(ORIGIN, ttl=900))
    assert verifier.verify(token).user_id
    new_key = generate_key("EdDSA")
    server.set_keys(new_key)  # the old key is withdrawn

    clock.advance(299)
    assert verifier.verify(token).user_id  # the set is young enough: no fetch
    assert server.request_count == 1

    clock.advance(2)
    reject(verifier, token, "unknown signing key")  # the verified-token cache included
    assert server.request_count == 2
    reject(verifier, ed_key.sign(better_auth_claims(ORIGIN)), "unknown signing key")
    assert verifier.verify(new_key.sign(better_auth_claims(ORIGIN))).user_id
    assert server.request_count == 2


def test_an_old_set_is_kept_when_its_refetch_fails(
    server: JwksServer,
    ed_key: SigningKey,
    clock: FakeClock,
    make_verifier: MakeVerifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = make_verifier(jwks_min_refetch_seconds=30, jwks_max_age_seconds=300)
    token = ed_key.sign(better_auth_claims(ORIGIN, ttl=900))
    assert verifier.verify(token).user_id
    server.respond(503, b"down")

    clock.advance(301)
    with caplog.at_level("WARNING", logger="service.auth"):
        assert verifier.verify(token).user_id
        assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    assert server.request_count == 2  # tried once; again only after the refetch interval
    warnings = [r for r in caplog.records if r.name == "service.auth" and r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == [
        f"JWKS fetch from {server.url} failed: HTTP status 503; the keys fetched before stay in use"
    ]

    clock.advance(31)
    assert verifier.verify(token).user_id
    assert server.request_count == 3

    server.set_keys(generate_key("EdDSA"))  # back, without the old key
    clock.advance(31)
    reject(verifier, token, "unknown signing key")
    assert server.request_count == 4


# Rejected tokens --------------------------------------------------------------


def _now() -> int:
    return int(time.time())


CLAIM_CASES: list[Any] = [
    pytest.param({"exp": _now() - 120, "iat": _now() - 1020}, "token expired", id="expired"),
    pytest.param({"nbf": _now() + 600}, "not yet valid", id="nbf-future"),
    pytest.param({"iat": _now() + 600, "exp": _now() + 1500}, "not yet valid", id="iat-future"),
    pytest.param({"exp": None}, "missing claim: exp", id="missing-exp"),
    pytest.param({"sub": None}, "missing claim: sub", id="missing-sub"),
    pytest.param({"sub": ""}, "invalid subject", id="empty-sub"),
    pytest.param({"sub": "   "}, "invalid subject", id="blank-sub"),
    pytest.param({"sub": 12345}, "invalid subject", id="int-sub"),
    pytest.param({"sub": "x" * 300}, "invalid subject", id="huge-sub"),
    # Longer than any {user_id} a path may hold: a token no route could serve.
    pytest.param({"sub": "x" * 129}, "invalid subject", id="sub-longer-than-a-path-id"),
    # Control characters (Unicode Cc, C1 too), which no `{user_id}` may hold either.
    pytest.param({"sub": "a\x00b"}, "invalid subject", id="nul-in-sub"),
    pytest.param({"sub": "dave\x85"}, "invalid subject", id="c1-control-in-sub"),
    pytest.param({"exp": str(_now() + 600)}, "invalid expiry", id="string-exp"),
    pytest.param({"exp": "soon"}, "malformed token", id="garbage-exp"),
    pytest.param({"iss": "http://evil.example"}, "invalid issuer", id="wrong-iss"),
    pytest.param({"iss": None}, "missing claim: iss", id="missing-iss"),
    pytest.param({"aud": "http://evil.example"}, "invalid audience", id="wrong-aud"),
    pytest.param({"aud": None}, "missing claim: aud", id="missing-aud"),
    pytest.param({"iss": ORIGIN + "/"}, "invalid issuer", id="iss-trailing-slash"),
]


@pytest.mark.parametrize(("overrides", "message"), CLAIM_CASES)
def test_rejects_bad_claims_in_jwks_mode(
    overrides: dict[str, Any], message: str, ed_key: SigningKey, make_verifier: MakeVerifier
) -> None:
    reject(make_verifier(leeway=30), ed_key.sign(better_auth_claims(ORIGIN, **overrides)), message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [case for case in CLAIM_CASES if case.id not in {"missing-iss", "missing-aud"}],
)
def test_rejects_bad_claims_in_hs256_mode(
    overrides: dict[str, Any], message: str, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(hs256_issuer=ORIGIN, hs256_audience=ORIGIN)
    reject(verifier, sign_hs256(better_auth_claims(ORIGIN, **overrides), SECRET), message)


def test_rejects_better_auth_session_cache_jwt(ed_key: SigningKey, verifier: TokenVerifier) -> None:
    claims = better_auth_claims(ORIGIN, aud="better-auth:session-cache")
    token = ed_key.sign(claims, headers={"typ": "better-auth.session-cache+jwt"})
    reject(verifier, token, "invalid audience")


def test_rejects_cookie_cache_hs256_jwt(verifier: TokenVerifier, server: JwksServer) -> None:
    now = _now()
    user = {"id": random_id(), "email": "u@example.com", "name": "U"}
    claims = {
        "session": {"session": {"id": random_id(), "userId": user["id"]}, "user": user},
        "updatedAt": now * 1000,
        "version": "1",
        "iat": now,
        "exp": now + 300,
    }
    reject(verifier, sign_hs256(claims, SECRET.encode()), "missing claim: sub")
    assert server.request_count == 0


def test_rejects_opaque_session_token(verifier: TokenVerifier, server: JwksServer) -> None:
    signature = base64.b64encode(b"\x01" * 32).decode()
    reject(verifier, f"{random_id()}.{signature}", "malformed token")
    assert server.request_count == 0


@pytest.mark.parametrize("secret_mode", [True, False], ids=["with-secret", "jwks-only"])
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_rejects_hs256_signed_with_public_key(
    alg: str,
    secret_mode: bool,
    keys: dict[str, SigningKey],
    server: JwksServer,
    make_verifier: MakeVerifier,
) -> None:
    key = keys[alg]
    server.set_keys(*keys.values())
    verifier = make_verifier(hs256_secret=SECRET if secret_mode else None)
    claims = better_auth_claims(ORIGIN)
    for key_bytes in (key.public_pem(), json.dumps(key.public_jwk()).encode()):
        token = hmac_token({"alg": "HS256", "kid": key.kid}, claims, key_bytes)
        reject(verifier, token, "invalid signature" if secret_mode else "algorithm not allowed")
    assert server.request_count == 0


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS384", "HS512", "RS512", "ES384", ""])
def test_rejects_algorithms_outside_both_lists(
    alg: str, ed_key: SigningKey, verifier: TokenVerifier, server: JwksServer
) -> None:
    header = {"alg": alg, "kid": ed_key.kid}
    claims = better_auth_claims(ORIGIN)
    reject(verifier, unsigned_token(header, claims), "algorithm not allowed")
    reject(verifier, unsigned_token(header, claims, b"sig"), "algorithm not allowed")
    assert server.request_count == 0


def test_rejects_token_signed_by_another_key(ed_key: SigningKey, verifier: TokenVerifier) -> None:
    impostor = generate_key("EdDSA", kid=ed_key.kid)
    reject(verifier, impostor.sign(better_auth_claims(ORIGIN)), "invalid signature")


def test_rejects_tampered_payload(ed_key: SigningKey, verifier: TokenVerifier) -> None:
    header, _, signature = ed_key.sign(better_auth_claims(ORIGIN)).split(".")
    forged = b64url(better_auth_claims(ORIGIN, sub="admin"))
    reject(verifier, f"{header}.{forged}.{signature}", "invalid signature")


def test_rejects_alg_that_does_not_match_the_key(
    keys: dict[str, SigningKey], server: JwksServer, verifier: TokenVerifier
) -> None:
    server.set_keys(*keys.values())
    es256, ed, rs, ps = keys["ES256"], keys["EdDSA"], keys["RS256"], keys["PS256"]
    claims = better_auth_claims(ORIGIN)
    # ES256 token naming the Ed25519 key; PS256 token naming the RS256-only key.
    reject(verifier, es256.sign(claims, headers={"kid": ed.kid}), "does not match")
    reject(verifier, ps.sign(claims, headers={"kid": rs.kid}), "does not match")
    # ES512 header over an ES256 key's kid.
    header = {"alg": "ES512", "kid": es256.kid}
    reject(verifier, unsigned_token(header, claims, b"\x00" * 132), "does not match")


@pytest.mark.parametrize(
    "crit_header",
    [{"crit": ["b64"], "b64": True}, {"crit": ["exp"], "exp": 1}, {"crit": []}],
    ids=["b64", "unknown-extension", "empty"],
)
def test_rejects_crit_header(
    crit_header: dict[str, Any], ed_key: SigningKey, verifier: TokenVerifier, server: JwksServer
) -> None:
    header = {"alg": "EdDSA", "kid": ed_key.kid, **crit_header}
    token = ed_key.sign_exact(header, better_auth_claims(ORIGIN))
    encoded_header = token.split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(encoded_header + "==")) == header
    reject(verifier, token)
    assert server.request_count == 0


@pytest.mark.parametrize("header_name", ["jku", "x5u", "jwk"])
@pytest.mark.parametrize("known_kid", [True, False], ids=["known-kid", "attacker-kid"])
def test_rejects_key_reference_headers_without_fetching(
    header_name: str,
    known_kid: bool,
    ed_key: SigningKey,
    verifier: TokenVerifier,
    server: JwksServer,
) -> None:
    signer = ed_key if known_kid else generate_key("EdDSA")
    with JwksServer([signer]) as attacker:
        value: Any = signer.public_jwk() if header_name == "jwk" else attacker.url
        token = signer.sign(better_auth_claims(ORIGIN), headers={header_name: value})
        reject(verifier, token, "key reference headers")
        assert attacker.request_count == 0
    assert server.request_count == 0


def test_x5c_header_is_not_used_to_pick_a_key(ed_key: SigningKey, verifier: TokenVerifier) -> None:
    impostor = generate_key("EdDSA", kid=ed_key.kid)
    cert_like = base64.b64encode(impostor.public_pem()).decode()
    token = impostor.sign(better_auth_claims(ORIGIN), headers={"x5c": [cert_like]})
    reject(verifier, token, "invalid signature")


@pytest.mark.parametrize("size", [MAX_TOKEN_LENGTH + 1, 100 * 1024])
def test_rejects_oversized_token_before_parsing(
    size: int, ed_key: SigningKey, verifier: TokenVerifier, server: JwksServer
) -> None:
    claims = better_auth_claims(ORIGIN, padding="p" * size)
    token = ed_key.sign(claims, headers={"kid": random_id()})
    assert len(token) > size
    reject(verifier, token, "token too large")
    reject(verifier, "a" * size, "token too large")
    assert server.request_count == 0


def test_accepts_a_token_whose_user_has_a_data_url_image(
    ed_key: SigningKey, verifier: TokenVerifier, server: JwksServer
) -> None:
    """Better Auth puts the user object in the token, `image` included: an avatar kept as a
    data URL makes a token of tens of KB, which must not lock its user out (it was refused
    as "malformed" past 8 KiB)."""
    server.set_keys(ed_key)
    user_id = random_id()
    image = "data:image/png;base64," + base64.b64encode(os.urandom(15_000)).decode()
    token = ed_key.sign(better_auth_claims(ORIGIN, user_id=user_id, image=image))
    assert 20_000 < len(token) < 30_000
    assert verifier.verify(token).user_id == user_id


GARBAGE = [
    "",
    " ",
    "null",
    "Bearer abc",
    "abc",
    "a.b",
    "a.b.c",
    "...",
    "....",
    "e30.e30.",
    "e30.e30.e30.e30",
    "eyJhbGciOiJFZERTQSJ9",
    "\x00.\x00.\x00",
    "é.é.é",
    b64url("[]") + "." + b64url("{}") + ".",
    b64url('{"alg": ["EdDSA"]}') + "." + b64url("{}") + ".",
    b64url('{"alg": "EdDSA", "kid": 7}') + "." + b64url("{}") + ".",
    b64url('{"alg": "HS256"}') + "." + b64url("[]") + ".AAAA",
    b64url('{"alg": "HS256"}') + ".%%%.AAAA",
    b64url('{"alg": "HS256"') + "." + b64url("{}") + ".",
    b64url("[" * 1500 + "]" * 1500) + "." + b64url("{}") + ".",
]


@pytest.mark.parametrize("token", GARBAGE)
def test_rejects_garbage(token: str, verifier: TokenVerifier, server: JwksServer) -> None:
    reject(verifier, token)
    assert server.request_count == 0


@pytest.mark.parametrize("token", [None, 123, b"e30.e30.e30", ["a"]])
def test_rejects_non_string_tokens(token: Any, verifier: TokenVerifier) -> None:
    reject(verifier, token, "malformed token")


def test_rejects_hs256_signed_with_a_different_secret(verifier: TokenVerifier) -> None:
    reject(verifier, create_dev_token("another-secret-" + "y" * 40, "u1"), "invalid signature")


def test_each_mode_only_when_configured(
    ed_key: SigningKey, server: JwksServer, make_verifier: MakeVerifier
) -> None:
    reject(make_verifier(hs256_secret=None), create_dev_token(SECRET, "u1"), "not allowed")
    reject(make_verifier(jwks_url=None), ed_key.sign(better_auth_claims(ORIGIN)), "not allowed")
    nothing = make_verifier(hs256_secret=None, jwks_url=None)
    reject(nothing, create_dev_token(SECRET, "u1"), "not allowed")
    assert server.request_count == 0


# Verified-token cache -----------------------------------------------------------


def test_cache_returns_same_principal_without_reverifying(
    ed_key: SigningKey, server: JwksServer, verifier: TokenVerifier
) -> None:
    token = ed_key.sign(better_auth_claims(ORIGIN))
    first = verifier.verify(token)
    server.set_keys()  # would make a fresh verification fail
    assert verifier.verify(token) is first
    hs_token = create_dev_token(SECRET, "u1")
    assert verifier.verify(hs_token) is verifier.verify(hs_token)


def test_cached_token_expires_by_the_clock(
    ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(leeway=0)
    claims = better_auth_claims(ORIGIN, ttl=60)
    token = ed_key.sign(claims)
    verifier.verify(token)
    clock.now = claims["exp"] - 1
    assert verifier.verify(token).expires_at == claims["exp"]
    clock.now = claims["exp"]
    reject(verifier, token, "token expired")


def test_cached_token_expiry_honours_leeway(
    ed_key: SigningKey, clock: FakeClock, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(leeway=30)
    claims = better_auth_claims(ORIGIN, ttl=60)
    token = ed_key.sign(claims)
    verifier.verify(token)
    clock.now = claims["exp"] + 29
    assert verifier.verify(token).user_id == claims["sub"]
    clock.now = claims["exp"] + 30
    reject(verifier, token, "token expired")


def test_cache_is_bounded(make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(cache_size=3)
    tokens = [create_dev_token(SECRET, f"user-{i}") for i in range(10)]
    principals = [verifier.verify(t) for t in tokens]
    assert len(verifier._cache) == 3
    # Recent entries are still cached; evicted ones are verified afresh (equal, not identical).
    assert verifier.verify(tokens[-1]) is principals[-1]
    again = verifier.verify(tokens[0])
    assert again == principals[0]
    assert again is not principals[0]
    assert make_verifier(cache_size=0).verify(tokens[0]) == principals[0]


def test_concurrent_verification(
    keys: dict[str, SigningKey], server: JwksServer, make_verifier: MakeVerifier
) -> None:
    server.set_keys(*keys.values())
    verifier = make_verifier(cache_size=8)
    tokens = [
        k.sign(better_auth_claims(ORIGIN, user_id=f"u{i}")) for i, k in enumerate(keys.values())
    ]
    tokens += [create_dev_token(SECRET, f"h{i}") for i in range(10)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda t: verifier.verify(t).user_id, tokens * 20))
    assert sorted(set(results)) == sorted(
        {f"u{i}" for i in range(5)} | {f"h{i}" for i in range(10)}
    )
    assert server.request_count == 1


# Configuration -----------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_from_settings_uses_origin_for_jwks_and_explicit_values_for_hs256(
    ed_key: SigningKey, server: JwksServer
) -> None:
    settings = Settings(
        _env_file=None,
        better_auth_secret=SECRET,
        better_auth_url=ORIGIN + "/some/path",
        better_auth_jwks_url=server.url,
    )
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.verify(ed_key.sign(better_auth_claims(ORIGIN))).user_id
    assert verifier.verify(create_dev_token(SECRET, "u1")).user_id == "u1"

    explicit = settings.model_copy(update={"jwt_issuer": "api", "jwt_audience": "todo"})
    strict = TokenVerifier.from_settings(explicit)
    reject(strict, create_dev_token(SECRET, "u1"), "missing claim")
    assert strict.verify(create_dev_token(SECRET, "u1", issuer="api", audience="todo")).user_id


@pytest.mark.usefixtures("clean_env")
def test_jwks_mode_requires_issuer_and_audience(server: JwksServer) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(hs256_secret=None, jwks_url=server.url, issuer=None, audience=ORIGIN)
    settings = Settings(_env_file=None, better_auth_jwks_url=server.url)
    with pytest.raises(ConfigError):
        TokenVerifier.from_settings(settings)
    with pytest.raises(ConfigError):
        TokenVerifier(hs256_secret=None, jwks_url="file:///etc/jwks", issuer="a", audience="a")
