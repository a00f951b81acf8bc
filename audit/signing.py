"""The Ed25519 key that signs audit checkpoints, and the public keys that verify them.

The private key comes from configuration (`AUDIT_SIGNING_KEY` or `AUDIT_SIGNING_KEY_FILE`) and
never goes into the database. A key id (the first 16 bytes of SHA-256 over the raw public key,
hex) goes into every checkpoint, so that after a rotation each checkpoint names the public key
that verifies it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ID_BYTES = 16
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class KeyFormatError(ValueError):
    """Key material that is not an Ed25519 key in a supported encoding."""


def key_id_of(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(*_RAW)).hexdigest()[: 2 * KEY_ID_BYTES]


@dataclass(frozen=True, slots=True)
class PublicKey:
    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def of(cls, key: Ed25519PublicKey) -> PublicKey:
        return cls(key, key_id_of(key))

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> str:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def jwk(self) -> dict[str, str]:
        """The key as an RFC 8037 OKP JWK."""
        x = base64.urlsafe_b64encode(self.key.public_bytes(*_RAW)).decode("ascii").rstrip("=")
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA"}


@dataclass(frozen=True, slots=True)
class SigningKey:
    private: Ed25519PrivateKey
    public: PublicKey

    @classmethod
    def of(cls, private: Ed25519PrivateKey) -> SigningKey:
        return cls(private, PublicKey.of(private.public_key()))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.of(Ed25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def private_pem(self) -> str:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")


def load_signing_key(text: str) -> SigningKey:
    """A PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519`), or the 32-byte seed in
    base64, which fits in an environment variable."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            private = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFormatError(f"not an unencrypted PEM private key ({exc})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFormatError("the PEM key is not an Ed25519 key")
        return SigningKey.of(private)
    try:
        seed = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyFormatError("expected a PEM Ed25519 private key or a base64 32-byte seed")
    return SigningKey.of(Ed25519PrivateKey.from_private_bytes(seed))


def load_signing_key_file(path: Path) -> SigningKey:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFormatError(f"cannot read {path}: {exc}") from None
    return load_signing_key(text)


def _public_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or not isinstance(jwk.get("x"), str):
        raise KeyFormatError("a JWK that is not an Ed25519 OKP key")
    x = jwk["x"]
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
        return PublicKey.of(Ed25519PublicKey.from_public_bytes(raw))
    except (binascii.Error, ValueError):
        raise KeyFormatError("a JWK whose x is not a 32-byte Ed25519 key") from None


def parse_public_keys(text: str) -> list[PublicKey]:
    """Public keys from PEM (one or more SubjectPublicKeyInfo blocks) or a JWK set
    (`{"keys": [...]}`, what the well-known path serves)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except (ValueError, RecursionError) as exc:  # nested too deep for the parser
            raise KeyFormatError(f"not JSON: {exc}") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise KeyFormatError('a JSON key file must be a JWK set: {"keys": [...]}')
        return [_public_from_jwk(k) for k in keys]
    marker = "-----END PUBLIC KEY-----"
    blocks = [b + marker for b in stripped.split(marker) if b.strip()]
    keys_out = []
    for block in blocks:
        try:
            public = serialization.load_pem_public_key(block.strip().encode("ascii"))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFormatError(f"not a PEM public key ({exc})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise KeyFormatError("the PEM key is not an Ed25519 key")
        keys_out.append(PublicKey.of(public))
    if not keys_out:
        raise KeyFormatError("no public key found")
    return keys_out


def key_ring(keys: Iterable[PublicKey]) -> dict[str, PublicKey]:
    return {key.key_id: key for key in keys}
