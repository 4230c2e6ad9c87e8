"""Webhook subscriptions, and the outbox rows written when a request changes state."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import NotFound
from app.core.security import fernet
from app.webhooks.models import DeliveryStatus, Webhook, WebhookDelivery


def create(db_session: Session, *, principal: Principal, url: str, secret_key: bytes
           ) -> tuple[Webhook, str]:
    secret = secrets.token_urlsafe(32)
    webhook = Webhook(id=str(uuid.uuid4()), client_id=principal.client_id, url=url,
                      secret_encrypted=fernet(secret_key).encrypt(secret.encode()).decode())
    db_session.add(webhook)
    audit.record(db_session, actor=principal.actor, action="webhook.created",
                 entity_type="webhook", entity_id=webhook.id, details={"url": url})
    db_session.commit()
    return webhook, secret


def list_for(db_session: Session, *, principal: Principal) -> list[Webhook]:
    query = select(Webhook).where(Webhook.active.is_(True))
    if principal.role != Role.admin:
        query = query.where(Webhook.client_id == principal.client_id)
    return list(db_session.scalars(query.order_by(Webhook.created_at)))


def delete(db_session: Session, *, principal: Principal, webhook_id: str) -> None:
    webhook = db_session.get(Webhook, webhook_id)
    if webhook is None or not webhook.active or (
            principal.role != Role.admin and webhook.client_id != principal.client_id):
        raise NotFound(f"Webhook {webhook_id!r} does not exist.")
    webhook.active = False
    audit.record(db_session, actor=principal.actor, action="webhook.deleted",
                 entity_type="webhook", entity_id=webhook.id, details={})
    db_session.commit()


def secret_of(webhook: Webhook, secret_key: bytes) -> bytes:
    return fernet(secret_key).decrypt(webhook.secret_encrypted.encode())


def active_subscriptions(client_id: str) -> ScalarSelect[int]:
    """How many active subscriptions the client has, as a subquery: a caller that queries in
    the same transaction anyway learns for free whether ``enqueue`` will find any."""
    return (select(func.count()).where(Webhook.client_id == client_id,
                                       Webhook.active.is_(True)).scalar_subquery())


def subscribed_clients(db_session: Session, client_ids: set[str]) -> set[str]:
    """Which of the clients have an active subscription: ``enqueue``'s ``subscribed`` for a
    batch of clients in one query."""
    if not client_ids:
        return set()
    return set(db_session.scalars(select(Webhook.client_id).distinct().where(
        Webhook.client_id.in_(client_ids), Webhook.active.is_(True))))


def enqueue(db_session: Session, *, client_id: str, event: str, payload: dict[str, Any],
            subscribed: bool = True) -> int:
    """Write one pending delivery per active subscription of the client, in the caller's
    transaction: the event is sent if and only if the state change commits. ``subscribed``
    False (the caller found none, in this transaction) skips looking them up."""
    if not subscribed:
        return 0
    hook_ids = db_session.scalars(select(Webhook.id).where(Webhook.client_id == client_id,
                                                           Webhook.active.is_(True))).all()
    for hook_id in hook_ids:
        db_session.add(WebhookDelivery(webhook_id=hook_id, event=event, payload=payload))
    return len(hook_ids)


# ---- delivery (called by the worker) ------------------------------------------------------

MAX_ATTEMPTS = 8
# While one sender holds a batch, others skip it; a sender that dies releases it by timeout.
LEASE = timedelta(seconds=60)


def backoff(attempts: int) -> timedelta:
    """10 s, 20 s, 40 s, ... capped at an hour."""
    return min(timedelta(seconds=10 * 2 ** max(attempts - 1, 0)), timedelta(hours=1))


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def lease_due(db_session: Session, *, limit: int = 50) -> list[tuple[WebhookDelivery, Webhook]]:
    now = utcnow()
    deliveries = db_session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.status == DeliveryStatus.pending.value,
                                      WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.id).limit(limit).with_for_update(skip_locked=True)).all()
    leased = []
    for delivery in deliveries:
        delivery.next_attempt_at = now + LEASE
        webhook = db_session.get(Webhook, delivery.webhook_id)
        if webhook is not None:
            leased.append((delivery, webhook))
    db_session.commit()
    return leased


def record_attempt(db_session: Session, *, delivery_id: int, status_code: int | None,
                   error: str | None) -> WebhookDelivery:
    delivery = db_session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    now = utcnow()
    delivery.attempts += 1
    delivery.last_status_code, delivery.last_error = status_code, error
    if status_code is not None and 200 <= status_code < 300:
        delivery.status, delivery.delivered_at = DeliveryStatus.delivered.value, now
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = DeliveryStatus.failed.value
    else:
        delivery.next_attempt_at = now + backoff(delivery.attempts)
    db_session.commit()
    return delivery
