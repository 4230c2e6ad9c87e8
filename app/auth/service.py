"""API key issuance and authentication."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import ApiKey, Role
from app.core.db import utcnow
from app.core.errors import NotFound, Unauthorized

KEY_PREFIX = "lethe"
# Recording every use would add a write to every request; a minute's precision is plenty.
LAST_USED_PRECISION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (the audit actor), role and client."""

    key_id: str
    role: Role
    client_id: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(
    db_session: Session, *, role: Role, client_id: str, name: str = "", actor: str = "system"
) -> tuple[ApiKey, str]:
    """Create a key and return it with its plain text, which is never stored."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    api_key = ApiKey(
        id=key_id, name=name, role=role.value, client_id=client_id,
        secret_hash=_hash_secret(secret),
    )
    db_session.add(api_key)
    audit.record(
        db_session, actor=actor, action="api_key.created", entity_type="api_key",
        entity_id=key_id, details={"role": role.value, "client_id": client_id, "name": name},
    )
    db_session.commit()
    return api_key, f"{KEY_PREFIX}_{key_id}_{secret}"


def authenticate(db_session: Session, *, presented: str) -> Principal:
    try:
        prefix, key_id, secret = presented.split("_", 2)
    except ValueError:
        raise Unauthorized("Malformed API key.") from None
    if prefix != KEY_PREFIX:
        raise Unauthorized("Malformed API key.")
    # The columns, not the entity: every request authenticates, and the identity map has no
    # use for a key.
    api_key = db_session.execute(
        select(ApiKey.secret_hash, ApiKey.role, ApiKey.client_id, ApiKey.revoked_at,
               ApiKey.last_used_at).where(ApiKey.id == key_id)).first()
    if api_key is None or not hmac.compare_digest(api_key.secret_hash, _hash_secret(secret)):
        raise Unauthorized("Invalid API key.")
    if api_key.revoked_at is not None:
        raise Unauthorized("This API key has been revoked.")
    now = utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_PRECISION:
        db_session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
        db_session.commit()
    return Principal(key_id=key_id, role=Role(api_key.role), client_id=api_key.client_id)


def get(db_session: Session, *, key_id: str) -> ApiKey:
    api_key = db_session.get(ApiKey, key_id)
    if api_key is None:
        raise NotFound(f"API key {key_id!r} does not exist.")
    return api_key


def list_all(db_session: Session) -> list[ApiKey]:
    return list(db_session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke(db_session: Session, *, key_id: str, actor: str) -> ApiKey:
    api_key = get(db_session, key_id=key_id)
    if api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
        audit.record(
            db_session, actor=actor, action="api_key.revoked", entity_type="api_key",
            entity_id=key_id, details={},
        )
        db_session.commit()
    return api_key
