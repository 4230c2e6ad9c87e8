"""Dashboard sign-ins kept on the server: a session the cookie names (so signing out ends it
there, not only in the browser), and the failed sign-ins that throttle a guessing address."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, BigIntId, UTCDateTime, utcnow

# The longest client address kept (an IPv6 address with a zone fits); longer ones are cut.
MAX_ADDRESS_LENGTH = 64


class DashboardSignIn(Base):
    """One dashboard session: live while unrevoked, unexpired and its key unrevoked."""

    __tablename__ = "dashboard_sessions"

    # Random (256 bits), carried in the signed session cookie.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(
        String(24), ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class FailedSignIn(Base):
    """A sign-in attempt from an address: written before the key is checked (so concurrent
    guesses count against each other), removed again unless the key was wrong."""

    __tablename__ = "dashboard_failed_logins"
    __table_args__ = (Index("ix_dashboard_failed_logins_address_at", "address", "attempted_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    address: Mapped[str] = mapped_column(String(MAX_ADDRESS_LENGTH))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
