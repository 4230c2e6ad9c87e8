"""The audit log: append-only, hash-chained. Row ``seq`` stores the hash of row ``seq - 1``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, BigIntId, JSONType, UTCDateTime


class AuditEvent(Base):
    __tablename__ = "audit_events"
    # An entity's history (a request's timeline) is read by entity, newest or oldest first.
    __table_args__ = (Index("ix_audit_events_entity", "entity_type", "entity_id", "seq"),)

    # Assigned by the appender under the chain lock: gap-free and in commit order, so a
    # deleted row shows up as a gap.
    seq: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=False)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    occurred_at: datetime
    actor: str = Field(description="`key:<id>` of the API key, or `system`.")
    action: str = Field(examples=["deletion_request.queued"])
    entity_type: str
    entity_id: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEventRead]
    next_cursor: str | None = Field(
        description="Pass as `after` for the next page (the last `seq` of this one).")


class BrokenLink(BaseModel):
    seq: int
    reason: str = Field(examples=["hash mismatch: the row was altered"])


class ChainVerification(BaseModel):
    ok: bool
    checked: int = Field(description="How many events were recomputed.")
    head_hash: str | None
    first_broken: BrokenLink | None = None
