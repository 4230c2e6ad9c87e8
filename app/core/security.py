"""Keyed hashing of subject references (the database only ever holds the HMAC) and the
service's symmetric encryption, both derived from the service secret key."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet


def subject_hash(secret_key: bytes, subject_ref: str) -> str:
    return hmac.new(secret_key, subject_ref.encode(), hashlib.sha256).hexdigest()


def fernet(secret_key: bytes) -> Fernet:
    """Symmetric encryption for secrets the service must read back (webhook HMAC keys)."""
    derived = hashlib.sha256(b"lethe/fernet/v1" + secret_key).digest()
    return Fernet(base64.urlsafe_b64encode(derived))
