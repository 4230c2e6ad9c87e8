"""Ed25519 signatures over canonical JSON: what a certificate is, and how anyone checks one."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
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
    except (InvalidSignature, ValueError):
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
