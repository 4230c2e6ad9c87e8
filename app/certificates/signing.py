"""Ed25519 signatures over canonical JSON: what a certificate is, and how anyone checks one."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"


def canonical_json(value: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def generate_private_key_pem() -> str:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


def load_private_key(pem: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key must be an Ed25519 key")
    return key


def load_public_key(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key must be an Ed25519 key")
    return key


def read_public_key(text: str) -> Ed25519PublicKey:
    """The verifying key from any form the API hands out: the PEM, the JSON body of
    GET /v1/certificates/public-key, or its RFC 8037 JWK alone. ValueError says what was
    wrong with anything else."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        return _pem_public_key(text)
    try:
        parsed = json.loads(text)
    except ValueError:
        raise ValueError("not a public key: expected a PEM, the JSON of GET "
                         "/v1/certificates/public-key, or an Ed25519 JWK") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a public key: the JSON is not an object")
    if "pem" in parsed or "jwk" in parsed:  # the endpoint's body
        pem = parsed.get("pem")
        key = _pem_public_key(pem) if isinstance(pem, str) else _jwk_public_key(parsed.get("jwk"))
        if parsed.get("key_id") not in (None, key_id(key)):
            raise ValueError("the key's `key_id` does not match the key it carries")
        return key
    return _jwk_public_key(parsed)


def _pem_public_key(pem: str) -> Ed25519PublicKey:
    try:
        return load_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not an Ed25519 public key PEM ({error})") from None


def _jwk_public_key(jwk: object) -> Ed25519PublicKey:
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("not an Ed25519 JWK: needs `\"kty\": \"OKP\"`, `\"crv\": "
                         "\"Ed25519\"` and `x`")
    x = jwk.get("x")
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)) if isinstance(x, str) else b""
    except ValueError:  # binascii.Error
        raw = b""
    if len(raw) != 32:
        raise ValueError("not an Ed25519 JWK: `x` must be 32 bytes, base64url")
    return Ed25519PublicKey.from_public_bytes(raw)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """RFC 8037 OKP key."""
    x = base64.urlsafe_b64encode(_raw(public_key)).decode().rstrip("=")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": key_id(public_key), "use": "sig",
            "alg": "EdDSA"}


def sign(private_key: Ed25519PrivateKey, statement: dict[str, Any]) -> str:
    return base64.b64encode(private_key.sign(canonical_json(statement))).decode()


def verify(public_key: Ed25519PublicKey, statement: dict[str, Any], signature: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature, validate=True), canonical_json(statement))
    except (InvalidSignature, ValueError, TypeError):  # TypeError: a signature not a string
        return False
    return True


def verify_document(document: dict[str, Any], public_key: Ed25519PublicKey) -> tuple[bool, str]:
    """Check a certificate document as served by the API; returns (valid, reason)."""
    try:
        statement, signature = document["certificate"], document["signature"]
    except (KeyError, TypeError):
        return False, "not a certificate document: needs `certificate` and `signature`"
    if document.get("algorithm", ALGORITHM) != ALGORITHM:
        return False, f"unsupported algorithm {document.get('algorithm')!r}"
    if document.get("key_id") not in (None, key_id(public_key)):
        return False, "signed with a different key (key_id does not match)"
    if not verify(public_key, statement, signature):
        return False, "signature does not match the certificate"
    return True, "valid"
