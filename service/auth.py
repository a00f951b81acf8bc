"""Bearer-token verification for Better Auth.

Two modes, each with its own fixed algorithm list, so a key is only ever used with the
algorithm family it was meant for:

* JWKS mode: tokens from Better Auth's `jwt` plugin (EdDSA, ES256, ES512, RS256, PS256), checked
  against the public keys served at `/api/auth/jwks`.
* HS256 mode: tokens signed with the shared `BETTER_AUTH_SECRET` (tutorial-style frontends).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from jwt.exceptions import InvalidSubjectError

from service.exceptions import AuthError, AuthUnavailable, TokenExpired
from service.settings import ConfigError, Settings
from service.text import is_user_id

logger = logging.getLogger(__name__)

# A Better Auth token carries the user object (`name`, `email`, `image`...): an `image` held
# as a data URL makes it tens of KB. Past this, refused unread, as the head's bound allows.
MAX_TOKEN_LENGTH = 32 * 1024
# The latest `exp` a Principal carries (the end of year 9999, where datetime ends).
EXPIRY_MAX = 253_402_300_799
MAX_JWKS_BYTES = 64 * 1024

HS256_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = ("EdDSA", "ES256", "ES512", "RS256", "PS256")

# The JWK key type (and curve) each JWKS algorithm may be used with.
_KEY_SHAPES: dict[str, tuple[str, str | None]] = {
    "EdDSA": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
}

# Headers that name where to get a key: trusting them lets the token choose its own key.
_KEY_REFERENCE_HEADERS = ("jku", "x5u", "jwk")


@dataclass(frozen=True)
class Principal:
    user_id: str
    email: str | None
    name: str | None
    expires_at: int
    # The token's `iat`: orders the claims of two tokens of one user (`service/users.py`).
    # Not part of who the caller is, so left out of equality.
    issued_at: int | None = field(default=None, compare=False)


class _JwksUnavailable(Exception):
    pass


@dataclass(frozen=True)
class _Jwk:
    kid: str | None
    by_alg: dict[str, jwt.PyJWK]  # every allowed algorithm this key may verify


@dataclass(frozen=True)
class _JwksState:
    keys: tuple[_Jwk, ...] = ()
    last_fetch_failed: bool = False
    fetched_at: float | None = None  # by the clock, when `keys` were fetched


# A verified token's user, and the key set that verified it (None: HS256).
_Verified = tuple[Principal, tuple[_Jwk, ...] | None]


def _parse_jwk(raw: Any) -> _Jwk | None:
    """One usable verification key, or None: a bad key must not poison the whole set."""
    if not isinstance(raw, dict):
        return None
    kid = raw.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    if raw.get("use", "sig") != "sig":
        return None
    declared = raw.get("alg")
    if declared is not None and declared not in JWKS_ALGORITHMS:
        return None
    by_alg: dict[str, jwt.PyJWK] = {}
    for alg in (declared,) if declared else JWKS_ALGORITHMS:
        kty, crv = _KEY_SHAPES[alg]
        if raw.get("kty") != kty or (crv is not None and raw.get("crv") != crv):
            continue
        try:
            by_alg[alg] = jwt.PyJWK(raw, algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
    return _Jwk(kid, by_alg) if by_alg else None


def _parse_jwks(document: Any) -> tuple[_Jwk, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _JwksUnavailable("not a JWK set")
    keys = tuple(key for raw in document["keys"] if (key := _parse_jwk(raw)) is not None)
    if document["keys"] and not keys:
        raise _JwksUnavailable("no usable key in the JWK set")
    return keys


def masked_url(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "(an invalid URL)"
    if not parsed.password:
        return str(parsed)
    mask = "***"  # as SQLAlchemy shows database URLs
    return str(parsed.copy_with(username=parsed.username, password=mask))


def _find_key(keys: tuple[_Jwk, ...], kid: str | None) -> _Jwk | None:
    if kid is None:
        # Without a kid the choice is only unambiguous when the set holds a single key.
        return keys[0] if len(keys) == 1 else None
    return next((key for key in keys if key.kid == kid), None)


def _auth_error_for(exc: jwt.PyJWTError) -> AuthError:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenExpired("token expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return AuthError("token not yet valid")
    if isinstance(exc, jwt.InvalidSignatureError):
        return AuthError("invalid signature")
    if isinstance(exc, jwt.InvalidAudienceError):
        return AuthError("invalid audience")
    if isinstance(exc, jwt.InvalidIssuerError):
        return AuthError("invalid issuer")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError(f"missing claim: {exc.claim}")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return AuthError("algorithm not allowed")
    if isinstance(exc, InvalidSubjectError):
        return AuthError("invalid subject")
    if isinstance(exc, jwt.InvalidKeyError):
        return AuthError("invalid signing key")
    if isinstance(exc, jwt.DecodeError):
        return AuthError("malformed token")
    return AuthError("invalid token")


class TokenVerifier:
    """Verifies bearer tokens; thread-safe, with a cache of already verified tokens.

    `issuer` and `audience` apply to JWKS tokens, which must always carry both (the audience
    check is what rejects Better Auth's session-cache JWT). HS256 tokens are checked against
    `hs256_issuer` / `hs256_audience` only when those are given, because tutorial frontends
    sign HS256 tokens without `iss`/`aud`.

    The key set is fetched again when a token needs a key it lacks (at most every
    `jwks_min_refetch_seconds`), and before a token is verified with a set older than
    `jwks_max_age_seconds`, so that a key removed from it stops being trusted. If that fetch
    fails, the keys held stay in use.

    `clock` (epoch seconds) drives the verified-token cache expiry and the JWKS refetch
    interval and maximum age; it exists so tests need not sleep.
    """

    def __init__(
        self,
        *,
        hs256_secret: str | None,
        jwks_url: str | None,
        issuer: str | None,
        audience: str | None,
        hs256_issuer: str | None = None,
        hs256_audience: str | None = None,
        leeway: int = 30,
        jwks_min_refetch_seconds: float = 30.0,
        jwks_max_age_seconds: float = 300.0,
        jwks_timeout_seconds: float = 3.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        reserved_subjects: frozenset[str] = frozenset(),
    ) -> None:
        if hs256_secret is not None:
            _check_secret(hs256_secret)
        jwks_auth: httpx.BasicAuth | None = None
        jwks_shown = jwks_url
        if jwks_url is not None:
            if urlsplit(jwks_url).scheme not in {"http", "https"}:
                raise ConfigError("BETTER_AUTH_JWKS_URL must be an http:// or https:// URL")
            try:
                parsed = httpx.URL(jwks_url)
            except httpx.InvalidURL:
                raise ConfigError(
                    "the JWKS URL (BETTER_AUTH_JWKS_URL, or BETTER_AUTH_URL's) is not a valid URL"
                ) from None
            if parsed.username or parsed.password:
                # Sent as auth, not in the URL: httpx logs each request's URL at INFO.
                jwks_auth = httpx.BasicAuth(parsed.username, parsed.password)
                jwks_shown = masked_url(jwks_url)
                jwks_url = str(parsed.copy_with(username=None, password=None))
            if not issuer or not audience:
                raise ConfigError(
                    "verifying JWKS tokens needs an issuer and an audience "
                    "(set BETTER_AUTH_URL, or JWT_ISSUER and JWT_AUDIENCE)"
                )
        if leeway < 0 or cache_size < 0 or jwks_min_refetch_seconds < 0:
            raise ValueError("leeway, cache_size and jwks_min_refetch_seconds must be >= 0")
        if jwks_timeout_seconds <= 0 or jwks_max_age_seconds <= 0:
            raise ValueError("jwks_timeout_seconds and jwks_max_age_seconds must be > 0")

        self._hs256_secret = hs256_secret
        self._jwks_url = jwks_url  # without credentials: they are in _jwks_auth
        self._jwks_auth = jwks_auth
        self.jwks_url_shown = jwks_shown  # for logs: the password masked
        self._issuer = issuer
        self._audience = audience
        self._hs256_issuer = hs256_issuer
        self._hs256_audience = hs256_audience
        self._leeway = leeway
        self._min_refetch = jwks_min_refetch_seconds
        self._max_age = jwks_max_age_seconds
        self._jwks_timeout = jwks_timeout_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._reserved_subjects = reserved_subjects

        # Replaced as a whole, so readers need no lock; the lock serialises fetches.
        self._jwks = _JwksState()
        self._fetch_lock = threading.Lock()
        self._last_fetch_at: float | None = None

        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        secret = settings.better_auth_secret
        return cls(
            hs256_secret=secret.get_secret_value() if secret is not None else None,
            jwks_url=settings.jwks_url,
            issuer=settings.expected_issuer,
            audience=settings.expected_audience,
            # Only explicit values: the BETTER_AUTH_URL-derived ones are for JWKS tokens.
            hs256_issuer=settings.jwt_issuer,
            hs256_audience=settings.jwt_audience,
            leeway=settings.jwt_leeway_seconds,
            jwks_min_refetch_seconds=settings.jwks_min_refetch_seconds,
            jwks_max_age_seconds=settings.jwks_max_age_seconds,
            jwks_timeout_seconds=settings.jwks_timeout_seconds,
            # The service's own actor: a token for it would pass as the service in the audit log.
            reserved_subjects=frozenset({settings.reminder_actor_id}),
        )

    # Public API -----------------------------------------------------------

    def verify(self, token: str) -> Principal:
        cached = self.cached(token)
        if cached is not None:
            return cached
        principal, keys = self._verify_uncached(token)
        self._cache_put(self._cache_key(token), (principal, keys))
        return principal

    def cached(self, token: str) -> Principal | None:
        """The principal of an already verified, unexpired token; never blocks on I/O.

        Lets an async caller skip the thread hop that `verify` may need for a JWKS fetch.
        None for a JWKS token verified with another key set than the current one, or with
        one due for a refetch: `verify` checks it again.
        """
        return self._cache_get(self._cache_key(token))

    @staticmethod
    def _cache_key(token: str) -> bytes:
        if not isinstance(token, str):
            raise AuthError("malformed token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token too large (over {MAX_TOKEN_LENGTH} characters)")
        if not token.isascii():
            raise AuthError("malformed token")
        return hashlib.sha256(token.encode("ascii")).digest()

    # Verification ---------------------------------------------------------

    def _verify_uncached(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _auth_error_for(exc) from None
        except (ValueError, TypeError):
            raise AuthError("malformed token") from None

        if any(name in header for name in _KEY_REFERENCE_HEADERS):
            raise AuthError("key reference headers are not accepted")
        if "crit" in header:
            raise AuthError("unsupported critical header")

        alg = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")

        key: jwt.PyJWK | str
        keys: tuple[_Jwk, ...] | None = None
        required = ["exp", "sub"]
        if alg in HS256_ALGORITHMS and self._hs256_secret is not None:
            key, issuer, audience = self._hs256_secret, self._hs256_issuer, self._hs256_audience
        elif alg in JWKS_ALGORITHMS and self._jwks_url is not None:
            # Only here, after the algorithm passed, may a token cause an outbound request.
            key, keys = self._jwks_key(kid, alg)
            issuer, audience = self._issuer, self._audience
            required += ["iss", "aud"]
        else:
            raise AuthError("algorithm not allowed")

        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=issuer,
                audience=audience,
                leeway=self._leeway,
                options={"require": required, "verify_aud": audience is not None},
            )
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError) as exc:
            self._log_mismatch(token, issuer, audience)
            raise _auth_error_for(exc) from None
        except jwt.PyJWTError as exc:
            raise _auth_error_for(exc) from None
        except (ValueError, TypeError, OverflowError):
            raise AuthError("malformed token") from None
        return self._principal_from(claims), keys

    @staticmethod
    def _log_mismatch(token: str, issuer: str | None, audience: str | None) -> None:
        """Say what was expected and what came: the usual cause is a misconfigured URL
        (`localhost` vs `127.0.0.1`, Better Auth without `baseURL`). Never the token."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return

        def shown(value: Any) -> str:
            return repr(value)[:200]

        logger.warning(
            "token issuer/audience mismatch: expected iss=%s aud=%s, received iss=%s aud=%s",
            shown(issuer),
            shown(audience),
            shown(claims.get("iss")),
            shown(claims.get("aud")),
            extra={
                "expected_issuer": issuer,
                "expected_audience": audience,
                "received_issuer": shown(claims.get("iss")),
                "received_audience": shown(claims.get("aud")),
            },
        )

    def _principal_from(self, claims: dict[str, Any]) -> Principal:
        sub = claims.get("sub")
        # What a `{user_id}` may be: a token no route could serve is not a valid token.
        if not is_user_id(sub):
            raise AuthError("invalid subject")
        if sub in self._reserved_subjects:
            raise AuthError("invalid subject")
        exp = claims.get("exp")
        # PyJWT accepts anything int() accepts (e.g. "123"); a JWT NumericDate is a number.
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise AuthError("invalid expiry")
        email = claims.get("email")
        name = claims.get("name")
        iat = claims.get("iat")
        return Principal(
            user_id=sub,
            email=email if isinstance(email, str) else None,
            name=name if isinstance(name, str) else None,
            # JSON integers have no bound: one past a float's range is as good as never, and
            # the change feed computes with it as a float.
            expires_at=min(int(exp), EXPIRY_MAX),
            # PyJWT has checked `iat` is not in the future; clamped to what a BIGINT holds.
            issued_at=(
                max(int(iat), 0)
                if isinstance(iat, int | float) and not isinstance(iat, bool) and math.isfinite(iat)
                else None
            ),
        )

    # JWKS -----------------------------------------------------------------

    @property
    def uses_jwks(self) -> bool:
        return self._jwks_url is not None

    def prefetch_keys(self) -> bool:
        """Fetch the key set now (at start-up, or when /readyz finds none); True if any key.

        Honours the refetch interval, so a probe cannot make it hammer the key server.
        """
        if self._jwks_url is None:
            return False
        if self._jwks.keys:
            return True
        with contextlib.suppress(AuthError, AuthUnavailable):
            self._refresh_and_find(None)
        return bool(self._jwks.keys)

    def keys_retry_after(self) -> int:
        """Whole seconds until the key set may be fetched again (at least 1): what a client
        told that the keys are unavailable should wait before retrying."""
        wait = self._refetch_wait(self._clock())
        return max(1, math.ceil(wait))

    def _refetch_wait(self, now: float) -> float:
        """Seconds until the key set may be fetched again: 0 when it may be now (nothing
        fetched yet, the interval over, or a clock that went back)."""
        last = self._last_fetch_at
        if last is None or not 0 <= now - last < self._min_refetch:
            return 0.0
        return self._min_refetch - (now - last)

    def _is_stale(self, state: _JwksState) -> bool:
        """Older than the maximum age (or fetched "in the future": the clock went back)."""
        if state.fetched_at is None:
            return False
        return not 0 <= self._clock() - state.fetched_at < self._max_age

    def _jwks_key(self, kid: str | None, alg: str) -> tuple[jwt.PyJWK, tuple[_Jwk, ...]]:
        """The key for this token, and the key set it is from."""
        state = self._jwks
        entry = _find_key(state.keys, kid)
        if entry is None:
            entry, keys = self._refresh_and_find(kid)
        elif self._is_stale(state) and self._fetch_lock.acquire(blocking=False):
            # Fetched again before use; meanwhile the other threads use the keys held.
            try:
                entry, keys = self._refresh_locked(kid)
            finally:
                self._fetch_lock.release()
        else:
            keys = state.keys
        key = entry.by_alg.get(alg)
        if key is None:
            raise AuthError("signing key does not match algorithm")
        return key, keys

    def _refresh_and_find(self, kid: str | None) -> tuple[_Jwk, tuple[_Jwk, ...]]:
        with self._fetch_lock:
            return self._refresh_locked(kid)

    def _refresh_locked(self, kid: str | None) -> tuple[_Jwk, tuple[_Jwk, ...]]:
        """Fetch the key set if it lacks the kid or is too old, at most every
        `jwks_min_refetch_seconds`; a failed fetch keeps the keys held. Hold `_fetch_lock`."""
        # Another thread may have fetched while this one waited for the lock.
        state = self._jwks
        entry = _find_key(state.keys, kid)
        if entry is not None and not self._is_stale(state):
            return entry, state.keys
        now = self._clock()
        if self._refetch_wait(now) == 0:
            self._last_fetch_at = now
            try:
                state = _JwksState(keys=self._fetch_jwks(), fetched_at=now)
            except _JwksUnavailable as exc:
                kept = "; the keys fetched before stay in use" if state.keys else ""
                logger.warning("JWKS fetch from %s failed: %s%s", self.jwks_url_shown, exc, kept)
                state = replace(state, last_fetch_failed=True)
            self._jwks = state
            entry = _find_key(state.keys, kid)
        if entry is not None:
            return entry, state.keys
        if state.last_fetch_failed:
            raise AuthUnavailable("signing keys are unavailable", self.keys_retry_after())
        raise AuthError("unknown signing key" if kid is not None else "missing key id")

    def _fetch_jwks(self) -> tuple[_Jwk, ...]:
        """Fetch and parse the key set; every failure becomes _JwksUnavailable.

        Redirects are not followed (the key set must come from the configured URL), the body
        is capped at MAX_JWKS_BYTES and the whole exchange at the timeout.
        """
        if self._jwks_url is None:
            raise _JwksUnavailable("no JWKS URL configured")
        deadline = time.monotonic() + self._jwks_timeout
        try:
            with (
                httpx.Client(
                    timeout=self._jwks_timeout, follow_redirects=False, auth=self._jwks_auth
                ) as client,
                client.stream(
                    "GET", self._jwks_url, headers={"Accept": "application/json"}
                ) as response,
            ):
                if response.status_code != 200:
                    raise _JwksUnavailable(f"HTTP status {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _JwksUnavailable("response too large")
                    if time.monotonic() > deadline:
                        raise _JwksUnavailable("response too slow")
            document = json.loads(bytes(body))
        except _JwksUnavailable:
            raise
        except (ValueError, RecursionError):
            raise _JwksUnavailable("response is not JSON") from None
        except Exception as exc:  # httpx, socket or TLS errors: all mean "unavailable".
            raise _JwksUnavailable(type(exc).__name__) from None
        return _parse_jwks(document)

    # Verified-token cache -------------------------------------------------

    def _cache_get(self, cache_key: bytes) -> Principal | None:
        if self._cache_size == 0:
            return None
        with self._cache_lock:
            verified = self._cache.get(cache_key)
            if verified is None:
                return None
            principal, keys = verified
            if principal.expires_at <= self._clock() - self._leeway:
                del self._cache[cache_key]
                raise TokenExpired("token expired")
            if keys is not None:
                # Its key may have left the set since: verified again with the current one.
                state = self._jwks
                if keys is not state.keys or self._is_stale(state):
                    return None
            self._cache.move_to_end(cache_key)
            return principal

    def _cache_put(self, cache_key: bytes, verified: _Verified) -> None:
        if self._cache_size == 0:
            return
        with self._cache_lock:
            self._cache[cache_key] = verified
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)


def _check_secret(secret: str) -> None:
    """An empty BETTER_AUTH_SECRET is a mistake, not "unset" (that would sign with the
    generated development secret); so are blanks around it."""
    if not secret:
        raise ConfigError("BETTER_AUTH_SECRET must not be empty: set a secret, or unset it")
    if secret != secret.strip():
        # A secret file made with `openssl rand -base64 32 > file` ends in a newline that a
        # frontend reading the secret from its .env (dotenv trims) does not have: every
        # token was a 401, with nothing said at start.
        raise ConfigError(
            "BETTER_AUTH_SECRET begins or ends with a blank or a newline: remove it "
            "(not shown: it is the secret)"
        )


def create_dev_token(
    secret: str,
    user_id: str,
    *,
    email: str | None = None,
    name: str | None = None,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token like a tutorial frontend would sign, for `todo-api dev-token`."""
    _check_secret(secret)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if email is not None:
        claims["email"] = email
    if name is not None:
        claims["name"] = name
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
