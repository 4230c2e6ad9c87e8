"""Dashboard sessions and sign-in throttling, kept in the database so that every API replica
sees the same: a sign-out ends the session everywhere, and an address that keeps guessing
keys is refused by all of them."""

from __future__ import annotations

import math
import secrets
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import TooManyRequests
from app.dashboard.models import MAX_ADDRESS_LENGTH, DashboardSignIn, FailedSignIn

# ---- sessions -----------------------------------------------------------------------------


def open_session(db_session: Session, *, key_id: str, lifetime: timedelta) -> str:
    """A new session for the key; returns its id, for the signed cookie."""
    now = utcnow()
    # Pruned on write: expired sessions (signed out or not) are dead either way.
    db_session.execute(delete(DashboardSignIn).where(DashboardSignIn.expires_at <= now))
    session_id = secrets.token_urlsafe(32)
    db_session.add(DashboardSignIn(id=session_id, key_id=key_id, created_at=now,
                                   expires_at=now + lifetime))
    db_session.commit()
    return session_id


def live_principal(db_session: Session, *, session_id: str) -> Principal | None:
    """The principal of a live session: it exists, is neither signed out nor expired, and
    its key is not revoked. None otherwise."""
    row = db_session.execute(
        select(ApiKey.id, ApiKey.role, ApiKey.client_id)
        .join(DashboardSignIn, DashboardSignIn.key_id == ApiKey.id)
        .where(DashboardSignIn.id == session_id, DashboardSignIn.revoked_at.is_(None),
               DashboardSignIn.expires_at > utcnow(), ApiKey.revoked_at.is_(None))).first()
    if row is None:
        return None
    return Principal(key_id=row.id, role=Role(row.role), client_id=row.client_id)


def revoke_session(db_session: Session, *, session_id: str) -> None:
    db_session.execute(update(DashboardSignIn)
                       .where(DashboardSignIn.id == session_id,
                              DashboardSignIn.revoked_at.is_(None))
                       .values(revoked_at=utcnow()))
    db_session.commit()


# ---- failed sign-ins ----------------------------------------------------------------------


def begin_attempt(db_session: Session, *, address: str, limit: int, window: timedelta) -> int:
    """Record a sign-in attempt from ``address`` before its key is checked; returns the
    attempt's id. TooManyRequests (with Retry-After) while the address has ``limit`` failed
    attempts within ``window``, whatever key it now presents.

    The attempt is committed before the others are counted: of concurrent attempts, only the
    first ``limit`` to be written can go on, so a burst cannot slip past the limit."""
    now = utcnow()
    address = address[:MAX_ADDRESS_LENGTH]
    db_session.execute(delete(FailedSignIn).where(FailedSignIn.attempted_at <= now - window))
    attempt = FailedSignIn(address=address, attempted_at=now)
    db_session.add(attempt)
    db_session.commit()
    attempt_id = attempt.id
    recent = db_session.scalars(
        select(FailedSignIn.attempted_at)
        .where(FailedSignIn.address == address, FailedSignIn.attempted_at > now - window,
               FailedSignIn.id != attempt_id)
        .order_by(FailedSignIn.attempted_at.desc(), FailedSignIn.id.desc())
        .limit(limit)).all()
    if len(recent) < limit:
        return attempt_id
    withdraw_attempt(db_session, attempt_id=attempt_id)  # a refused attempt is no new failure
    # Free again once the limit-th most recent failure leaves the window.
    retry_after = max(1, math.ceil((recent[-1] + window - now).total_seconds()))
    raise TooManyRequests(
        f"Too many failed sign-ins from this address; try again in {_wait(retry_after)}.",
        headers={"Retry-After": str(retry_after)}, retry_after=retry_after)


def withdraw_attempt(db_session: Session, *, attempt_id: int) -> None:
    """The attempt was no guess at a key (a stale form, a key of another role): forget it."""
    db_session.execute(delete(FailedSignIn).where(FailedSignIn.id == attempt_id))
    db_session.commit()


def clear_failures(db_session: Session, *, address: str) -> None:
    """A successful sign-in clears the address's failures."""
    db_session.execute(delete(FailedSignIn)
                       .where(FailedSignIn.address == address[:MAX_ADDRESS_LENGTH]))
    db_session.commit()


def _wait(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{seconds} seconds" if seconds < 120 else f"{minutes} minutes"
