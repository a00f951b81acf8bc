"""Real signing keys, Better-Auth-shaped tokens and a local JWKS server, for tests.

Typical use::

    key = generate_key("EdDSA")
    with JwksServer([key]) as jwks:
        token = key.sign(better_auth_claims(ORIGIN))
        ...  # configure the app with jwks.url; jwks.request_count counts fetches
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import string
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from tests.http_helpers import LocalHttpServer, QuietHandler

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

JWKS_ALGORITHMS = ("EdDSA", "ES256", "ES512", "RS256", "PS256")
_ID_ALPHABET = string.ascii_letters + string.digits


def random_id(length: int = 32) -> str:
    """An id shaped like Better Auth's (32 alphanumeric characters)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def b64url(data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    alg: str
    kid: str
    private_key: PrivateKey

    def public_jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        """The public JWK as Better Auth serves it (`alg`, `kid`, `kty`, curve/modulus)."""
        algorithm = get_default_algorithms()[self.alg]
        jwk: dict[str, Any] = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk["kid"] = self.kid
        if with_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], *, headers: dict[str, Any] | None = None) -> str:
        """Header is only `alg` + `kid`, like Better Auth; `headers` adds to it or, with a
        None value, removes an entry (e.g. `{"kid": None}`)."""
        header: dict[str, Any] = {"kid": self.kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not None}
        header["typ"] = header.get("typ")  # PyJWT drops a None typ instead of adding "JWT"
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=header)

    def sign_exact(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """Sign with exactly this header (PyJWT's encode rewrites some header fields)."""
        signing_input = f"{b64url(header)}.{b64url(claims)}"
        algorithm = get_default_algorithms()[self.alg]
        signature = algorithm.sign(signing_input.encode(), self.private_key)
        return f"{signing_input}.{b64url(signature)}"


def generate_key(alg: str = "EdDSA", kid: str | None = None) -> SigningKey:
    private_key: PrivateKey
    if alg == "EdDSA":
        private_key = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES512":
        private_key = ec.generate_private_key(ec.SECP521R1())
    elif alg in {"RS256", "PS256"}:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unsupported algorithm {alg}")
    return SigningKey(alg=alg, kid=kid or random_id(), private_key=private_key)


def better_auth_claims(
    origin: str,
    *,
    user_id: str | None = None,
    email: str | None = "user@example.com",
    name: str | None = "Test User",
    iat: int | None = None,
    ttl: int = 900,
    **overrides: Any,
) -> dict[str, Any]:
    """Claims like Better Auth's jwt plugin issues; `overrides` set claims, and any claim
    whose value is None is left out (e.g. `exp=None`)."""
    user_id = user_id or random_id()
    iat = int(time.time()) if iat is None else iat
    claims: dict[str, Any] = {
        "iat": iat,
        "name": name,
        "email": email,
        "emailVerified": False,
        "id": user_id,
        "sub": user_id,
        "exp": iat + ttl,
        "iss": origin,
        "aud": origin,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign_hs256(
    claims: dict[str, Any], secret: str | bytes, *, headers: dict[str, Any] | None = None
) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


def hmac_token(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """HS256 by hand, with any key: PyJWT refuses to sign with a PEM key as the HMAC secret."""
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(header)}.{b64url(claims)}.{b64url(signature)}"


class JwksServer(LocalHttpServer):
    """A JWKS endpoint on 127.0.0.1 (random port) in a thread; use as a context manager.

    The key set can be swapped at runtime (`set_keys`), or the endpoint made to misbehave
    (`respond`); `request_count` counts every request it received, and `authorizations` holds
    each one's `Authorization` header (None when absent).
    """

    path = "/api/auth/jwks"

    def __init__(self, keys: Iterable[SigningKey | dict[str, Any]] = ()) -> None:
        self._lock = threading.Lock()
        self._request_count = 0
        self._authorizations: list[str | None] = []
        self._status = 200
        self._body = b""
        self._headers: dict[str, str] = {}
        self.set_keys(*keys)
        super().__init__(self._handler_class())

    @property
    def url(self) -> str:
        return self.origin + self.path

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._request_count

    @property
    def authorizations(self) -> list[str | None]:
        with self._lock:
            return list(self._authorizations)

    def set_keys(self, *keys: SigningKey | dict[str, Any]) -> None:
        """Serve these keys (SigningKeys or raw JWK dicts) as a 200 JSON key set."""
        jwks = [k.public_jwk() if isinstance(k, SigningKey) else k for k in keys]
        self.respond(200, json.dumps({"keys": jwks}).encode())

    def respond(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        """Answer every request with this status, body and headers from now on."""
        with self._lock:
            self._status, self._body, self._headers = status, body, dict(headers or {})

    def _handler_class(self) -> type[QuietHandler]:
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner._request_count += 1
                    owner._authorizations.append(self.headers.get("Authorization"))
                    status, body, headers = owner._status, owner._body, owner._headers
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler
