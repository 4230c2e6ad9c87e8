"""Webhooks: HMAC-signed POSTs to a client's endpoint when its requests change state.

Deliveries are written in the same transaction as the state change (a transactional outbox)
and sent by the worker with retries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field
from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, BigIntId, JSONType, UTCDateTime, utcnow


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # gave up after the last retry, or its target was refused
    canceled = "canceled"  # its webhook was deleted before it was sent


# The URL column's length, and the longest URL a webhook may be registered with.
MAX_URL_LENGTH = 2048


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    url: Mapped[str] = mapped_column(String(MAX_URL_LENGTH))
    # Encrypted with the service key (Fernet): the HMAC needs the secret itself.
    secret_encrypted: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookCreate(BaseModel):
    url: AnyHttpUrl = Field(
        max_length=MAX_URL_LENGTH, examples=["https://crm.example.com/hooks/lethe"],
        description="An http(s) endpoint whose host resolves to public addresses only "
                    "(unless the operator allows a network: `LETHE_WEBHOOK_ALLOWED_NETWORKS`).")


class WebhookRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    client_id: str
    url: str
    active: bool
    created_at: datetime


class WebhookCreated(WebhookRead):
    secret: str = Field(description="HMAC-SHA256 key for the `Lethe-Signature` header. "
                                    "Shown once.")
