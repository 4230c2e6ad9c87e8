"""Webhook subscriptions, and the outbox rows written when a request changes state."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import ScalarSelect, func, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import NotFound, Unprocessable
from app.core.security import fernet
from app.webhooks import targets
from app.webhooks.models import DeliveryStatus, Webhook, WebhookDelivery


def create(db_session: Session, *, principal: Principal, url: str, secret_key: bytes,
           allowed_networks: Sequence[targets.IPNetwork] = ()) -> tuple[Webhook, str]:
    """Subscribe the principal's client; a URL that may not be a target (see ``targets``) is
    refused with nothing stored."""
    try:
        targets.check(url, allowed_networks=allowed_networks)
    except (targets.TargetRefused, targets.TargetUnresolvable) as refusal:
        raise Unprocessable(
            f"The webhook URL {refusal}; webhooks are sent to public addresses only (an "
            "operator may allow networks with LETHE_WEBHOOK_ALLOWED_NETWORKS).",
            errors=[{"loc": ["body", "url"], "msg": str(refusal),
                     "type": "webhook_target_refused"}]) from None
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
    """Deactivate the webhook and cancel its pending deliveries, together: none is sent
    after the unsubscription commits."""
    webhook = db_session.get(Webhook, webhook_id)
    if webhook is None or not webhook.active or (
            principal.role != Role.admin and webhook.client_id != principal.client_id):
        raise NotFound(f"Webhook {webhook_id!r} does not exist.")
    webhook.active = False
    db_session.execute(update(WebhookDelivery).where(
        WebhookDelivery.webhook_id == webhook.id,
        WebhookDelivery.status == DeliveryStatus.pending.value,
    ).values(status=DeliveryStatus.canceled.value))
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
    """Due deliveries of active webhooks, held for ``LEASE`` from other senders."""
    now = utcnow()
    rows = db_session.execute(
        select(WebhookDelivery, Webhook)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.status == DeliveryStatus.pending.value,
               WebhookDelivery.next_attempt_at <= now, Webhook.active.is_(True))
        .order_by(WebhookDelivery.id).limit(limit)
        .with_for_update(skip_locked=True, of=WebhookDelivery)).all()
    leased = [(delivery, webhook) for delivery, webhook in rows]
    for delivery, _ in leased:
        delivery.next_attempt_at = now + LEASE
    db_session.commit()
    return leased


def still_due(db_session: Session, *, delivery_id: int) -> bool:
    """Whether a leased delivery is still to be sent: its webhook may have been deleted (and
    the delivery canceled) since the lease. Ends its read, so no transaction stays open
    while the worker waits on the endpoint."""
    pending = db_session.scalar(
        select(func.count()).select_from(WebhookDelivery)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(WebhookDelivery.id == delivery_id,
               WebhookDelivery.status == DeliveryStatus.pending.value,
               Webhook.active.is_(True)))
    db_session.commit()
    return bool(pending)


def record_refusal(db_session: Session, *, delivery_id: int, reason: str) -> WebhookDelivery:
    """The target was refused right before sending (its host now resolves to an address
    webhooks may not reach): a policy decision that retrying would only repeat, so the
    delivery fails now, with the reason as its error."""
    delivery = _attempted(db_session, delivery_id, status_code=None, error=f"refused: {reason}")
    if delivery.status == DeliveryStatus.pending.value:
        delivery.status = DeliveryStatus.failed.value
    db_session.commit()
    return delivery


def record_attempt(db_session: Session, *, delivery_id: int, status_code: int | None,
                   error: str | None) -> WebhookDelivery:
    delivery = _attempted(db_session, delivery_id, status_code=status_code, error=error)
    now = utcnow()
    if delivery.status != DeliveryStatus.pending.value:  # canceled while it was being sent
        db_session.commit()
        return delivery
    if status_code is not None and 200 <= status_code < 300:
        delivery.status, delivery.delivered_at = DeliveryStatus.delivered.value, now
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = DeliveryStatus.failed.value
    else:
        delivery.next_attempt_at = now + backoff(delivery.attempts)
    db_session.commit()
    return delivery


def _attempted(db_session: Session, delivery_id: int, *, status_code: int | None,
               error: str | None) -> WebhookDelivery:
    # Read afresh and locked: a delete may have canceled it since it was leased.
    delivery = db_session.get(WebhookDelivery, delivery_id, populate_existing=True,
                              with_for_update=True)
    assert delivery is not None
    delivery.attempts += 1
    delivery.last_status_code, delivery.last_error = status_code, error
    return delivery
