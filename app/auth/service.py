"""API key issuance and authentication."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import ApiKey, Role, check_client_id
from app.core.db import utcnow
from app.core.errors import Forbidden, NotFound, Unauthorized, Unprocessable

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


# Who may submit and cancel deletion requests.
SUBMITTERS = (Role.requester, Role.operator)


def authorize(principal: Principal, roles: Iterable[Role]) -> Principal:
    """The principal, if its role is one of ``roles`` (an admin may do anything)."""
    allowed = set(roles) | {Role.admin}
    if principal.role not in allowed:
        raise Forbidden(f"This needs one of the roles: "
                        f"{', '.join(sorted(r.value for r in allowed))}.")
    return principal


def create(
    db_session: Session, *, role: Role, client_id: str, name: str = "", actor: str = "system"
) -> tuple[ApiKey, str]:
    """Create a key and return it with its plain text, which is never stored."""
    try:
        check_client_id(client_id)
    except ValueError as invalid:
        raise Unprocessable(f"{invalid}.") from None
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
    (principal,), used = _check(db_session, [presented])
    if isinstance(principal, Unauthorized):
        raise principal
    if used:
        _touch(db_session, used)
        db_session.commit()
    return principal


def authenticate_many(db_session: Session, presented: Sequence[str]
                      ) -> list[Principal | Unauthorized]:
    """Check many presented keys in one query; each answer is its principal or why it was
    refused. The last-used times that moved are updated in the caller's transaction."""
    answers, used = _check(db_session, presented)
    _touch(db_session, used)
    return answers


def _check(db_session: Session, presented: Sequence[str]
           ) -> tuple[list[Principal | Unauthorized], set[str]]:
    """The answer for each presented key, and the ids of the valid keys whose last-used time
    is older than its precision."""
    parsed = [_parse(key) for key in presented]
    ids = {item[0] for item in parsed if isinstance(item, tuple)}
    # The columns, not the entity: every request authenticates, and the identity map has no
    # use for a key.
    rows = {row.id: row for row in db_session.execute(
        select(ApiKey.id, ApiKey.secret_hash, ApiKey.role, ApiKey.client_id,
               ApiKey.revoked_at, ApiKey.last_used_at).where(ApiKey.id.in_(ids)))} if ids else {}
    now = utcnow()
    answers: list[Principal | Unauthorized] = []
    used: set[str] = set()
    for item in parsed:
        if isinstance(item, Unauthorized):
            answers.append(item)
            continue
        key_id, secret = item
        row = rows.get(key_id)
        if row is None or not hmac.compare_digest(row.secret_hash, _hash_secret(secret)):
            answers.append(Unauthorized("Invalid API key."))
        elif row.revoked_at is not None:
            answers.append(Unauthorized("This API key has been revoked."))
        else:
            answers.append(Principal(key_id=key_id, role=Role(row.role),
                                     client_id=row.client_id))
            if row.last_used_at is None or now - row.last_used_at > LAST_USED_PRECISION:
                used.add(key_id)
    return answers, used


def _touch(db_session: Session, key_ids: set[str]) -> None:
    if key_ids:
        db_session.execute(update(ApiKey).where(ApiKey.id.in_(key_ids))
                           .values(last_used_at=utcnow()))


def _parse(presented: str) -> tuple[str, str] | Unauthorized:
    try:
        prefix, key_id, secret = presented.split("_", 2)
    except ValueError:
        return Unauthorized("Malformed API key.")
    if prefix != KEY_PREFIX:
        return Unauthorized("Malformed API key.")
    return key_id, secret


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
