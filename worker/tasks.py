"""Celery tasks: thin wrappers that call the pipeline and the domain services."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx
from celery import Task
from sqlalchemy.orm import Session

from app.jobs import scheduled
from app.jobs.models import JobOutcome
from app.references import service as reference_sets
from app.webhooks import service as webhooks
from app.webhooks import targets
from app.webhooks.models import Webhook, WebhookDelivery
from worker import context, maintenance, pipeline
from worker import references as references_job
from worker.celery_app import celery_app

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10.0


def _send(task: Any, ids: list[Any], mark: Callable[..., None]) -> None:
    """Hand ``task`` for each id to the broker on the job queue (both kinds of work want the
    GPU), then record when with ``mark`` (the sweeper re-sends stale ones)."""
    if not ids:
        return
    ctx = context.current()
    for item in ids:
        task.apply_async((item,), queue=ctx.settings.job_queue)
    with ctx.session() as db_session:
        mark(db_session, ids)


def dispatch(job_ids: Iterable[str]) -> None:
    _send(run_job, list(job_ids), scheduled.mark_dispatched)


def dispatch_references(set_ids: Iterable[int]) -> None:
    _send(build_references, list(set_ids), reference_sets.mark_dispatched)


@celery_app.task(name="lethe.batch")
def batch() -> list[str]:
    """Plan unlearning jobs, and send reference jobs nobody has sent yet (asked for through
    the API, which does not talk to the broker)."""
    ctx = context.current()
    with ctx.session() as db_session:
        created = [job.id for job in scheduled.plan_batches(db_session)]
        waiting_sets = reference_sets.undispatched(
            db_session, older_than=max(60.0, 3 * ctx.settings.heartbeat_timeout_seconds))
    dispatch(created)
    dispatch_references(waiting_sets)
    return created


@celery_app.task(name="lethe.build_references")
def build_references(set_id: int) -> str:
    return references_job.build(context.current(), set_id)


@celery_app.task(name="lethe.run_job", bind=True)
def run_job(self: Task, job_id: str) -> str:
    ctx = context.current()
    outcome = pipeline.run(ctx, job_id, task_id=self.request.id)
    if outcome is JobOutcome.requeued:
        dispatch([job_id])
    elif outcome in (JobOutcome.published, JobOutcome.unchanged):
        maintenance.run_all(ctx)  # erase what the publish made erasable, now
    return outcome


@celery_app.task(name="lethe.sweep")
def sweep() -> list[str]:
    """Jobs whose worker stopped heart-beating go back to the queue; queued jobs whose
    message may be lost are sent again (claiming makes duplicates harmless)."""
    ctx = context.current()
    timeout = ctx.settings.heartbeat_timeout_seconds
    with ctx.session() as db_session:
        again = scheduled.requeue_lost(db_session, heartbeat_timeout=timeout)
        again += scheduled.undispatched(db_session, older_than=max(60.0, 3 * timeout))
        lost_sets = reference_sets.requeue_lost(db_session, heartbeat_timeout=timeout)
    dispatch(sorted(set(again)))
    dispatch_references(lost_sets)
    return again


@celery_app.task(name="lethe.purge")
def purge() -> dict[str, int]:
    return maintenance.run_all(context.current())


@celery_app.task(name="lethe.deliver_webhooks")
def deliver_webhooks() -> int:
    ctx = context.current()
    secret_key = ctx.settings.resolved_secret_key()
    allowed_networks = ctx.settings.webhook_allowed_network_list
    sent = 0
    with ctx.session() as db_session:
        due = webhooks.lease_due(db_session)
        with httpx.Client(timeout=WEBHOOK_TIMEOUT, follow_redirects=False) as client:
            for delivery, webhook in due:
                if not webhooks.still_due(db_session, delivery_id=delivery.id):
                    continue  # its webhook was deleted since the lease
                result = _attempt(db_session, client, delivery, webhook,
                                  secret=webhooks.secret_of(webhook, secret_key),
                                  allowed_networks=allowed_networks)
                log.info("webhook %s %s -> %s (attempt %d, %s)", delivery.event, webhook.url,
                         result.last_status_code or result.last_error, result.attempts,
                         result.status)
                sent += 1
    return sent


def _attempt(db_session: Session, client: httpx.Client, delivery: WebhookDelivery,
             webhook: Webhook, *, secret: bytes,
             allowed_networks: Sequence[targets.IPNetwork]) -> WebhookDelivery:
    """Check the target again (its DNS may have changed since registration), then send; a
    refused target fails the delivery at once, anything else is retried with backoff."""
    try:
        target = targets.check(webhook.url, allowed_networks=allowed_networks)
    except targets.TargetRefused as refusal:
        return webhooks.record_refusal(db_session, delivery_id=delivery.id, reason=str(refusal))
    except targets.TargetUnresolvable as unresolvable:  # DNS may recover
        return webhooks.record_attempt(db_session, delivery_id=delivery.id, status_code=None,
                                       error=str(unresolvable))
    status, error = _post(client, target, delivery.event, delivery.payload, secret)
    return webhooks.record_attempt(db_session, delivery_id=delivery.id, status_code=status,
                                   error=error)


def _post(client: httpx.Client, target: targets.Target, event: str, payload: dict[str, Any],
          secret: bytes) -> tuple[int | None, str | None]:
    """POST to the checked address itself, naming the registered host in ``Host`` and, for
    https, in the TLS handshake (so its certificate is verified against that name)."""
    body = json.dumps({"event": event, "data": payload}, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Lethe-Event": event,
               "Lethe-Signature": webhooks.signature(secret, body, int(time.time())),
               "Host": target.host_header}
    extensions = {"sni_hostname": target.server_name} if target.server_name else None
    try:
        response = client.post(target.url, content=body, headers=headers,
                               extensions=extensions)
    except httpx.HTTPError as error:
        return None, f"{type(error).__name__}: {error}"
    return response.status_code, None if response.is_success else response.text[:500]
