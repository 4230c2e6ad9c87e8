"""Routes for a client's webhook subscriptions."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import SecretKeyDep, SessionDep, SettingsDep, Submitter
from app.core.errors import PROBLEM
from app.webhooks import service
from app.webhooks.models import WebhookCreate, WebhookCreated, WebhookRead

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreated,
             summary="Subscribe to your requests' state changes",
             responses={422: {**PROBLEM, "description": "The URL is refused: not http(s), "
                              "longer than 2048 characters, a host that does not resolve, "
                              "or one that resolves to a non-public address."}})
def create_webhook(body: WebhookCreate, db_session: SessionDep, principal: Submitter,
                   secret_key: SecretKeyDep, settings: SettingsDep) -> WebhookCreated:
    """Each state change of one of your client's requests is POSTed as JSON with a
    `Lethe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">` header.

    The URL's host must resolve to public addresses only (no loopback, link-local, private,
    multicast or reserved ones, unless the operator allows their network); this is checked
    again before each delivery, and a delivery to a refused address fails unsent."""
    webhook, secret = service.create(db_session, principal=principal, url=str(body.url),
                                     secret_key=secret_key,
                                     allowed_networks=settings.webhook_allowed_network_list)
    return WebhookCreated(**WebhookRead.model_validate(webhook).model_dump(), secret=secret)


@router.get("", response_model=list[WebhookRead], summary="List your webhooks")
def list_webhooks(db_session: SessionDep, principal: Submitter) -> list[WebhookRead]:
    return [WebhookRead.model_validate(w) for w in service.list_for(db_session,
                                                                     principal=principal)]


@router.delete("/{webhook_id}", status_code=204, response_class=Response,
               summary="Unsubscribe", responses={404: PROBLEM})
def delete_webhook(webhook_id: str, db_session: SessionDep, principal: Submitter) -> Response:
    """Its deliveries not yet sent are canceled."""
    service.delete(db_session, principal=principal, webhook_id=webhook_id)
    return Response(status_code=204)
