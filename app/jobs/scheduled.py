"""Jobs on a schedule (Celery beat, worker/tasks.py): batching queued targets into jobs, the
dispatch bookkeeping, and the sweeps that send lost jobs round again."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.jobs import flows
from app.jobs.models import JobStatus, UnlearningJob
from app.jobs.service import ACTIVE, RUNNING
from app.models_registry import service as registry
from app.models_registry.models import Model, Policy
from app.references import service as references
from app.requests.models import DeletionRequest, DeletionTarget, TargetStatus

log = logging.getLogger(__name__)


# ---- batching -----------------------------------------------------------------------------


@dataclass
class _Waiting:
    target_id: int
    scenario: dict[str, Any]  # Scenario.to_dict(): equal ones share a job
    queued_at: datetime
    due_at: datetime


def plan_batches(db_session: Session, *, now: datetime | None = None) -> list[UnlearningJob]:
    """Turn queued targets into jobs: per model, flush when `max_batch` wait, when the oldest
    waited `max_wait_seconds`, or at once when a deadline is within `due_soon_hours`. One
    active job per model (a unique index enforces it), so a model's versions form a line."""
    now = now or utcnow()
    rows = db_session.execute(
        select(DeletionTarget.model_id, DeletionTarget.id, DeletionTarget.scenario,
               DeletionTarget.queued_at, DeletionRequest.due_at)
        .join(DeletionRequest, DeletionRequest.id == DeletionTarget.request_id)
        .where(DeletionTarget.status == TargetStatus.queued.value,
               DeletionTarget.job_id.is_(None))
        .order_by(DeletionTarget.queued_at, DeletionTarget.id))
    waiting: dict[int, list[_Waiting]] = defaultdict(list)
    for model_id, target_id, scenario, queued_at, due_at in rows:
        waiting[model_id].append(_Waiting(target_id, scenario, queued_at or now, due_at))
    if not waiting:
        return []
    busy = set(db_session.scalars(select(UnlearningJob.model_id).where(
        UnlearningJob.status.in_(ACTIVE))))
    busy |= references.models_waiting(db_session, waiting)  # per-sample evidence first
    created = []
    for model_id, queue in waiting.items():
        if model_id in busy:
            continue
        model = db_session.get(Model, model_id)
        assert model is not None
        if registry.alias_target(db_session, model=model) is None:
            log.info("model %s has no production version yet; its requests wait", model.name)
            continue
        job = _flush(db_session, model, queue, now)
        if job is not None:
            created.append(job)
    return created


def _flush(db_session: Session, model: Model, queue: list[_Waiting], now: datetime
           ) -> UnlearningJob | None:
    policy = Policy.model_validate(model.policy).batching
    scenario = queue[0].scenario  # the oldest waiting target decides this batch's scenario
    batch = [w for w in queue if w.scenario == scenario][:policy.max_batch]
    if len(batch) >= policy.max_batch:
        reason = "full"
    elif batch[0].queued_at <= now - timedelta(seconds=policy.max_wait_seconds):
        reason = "waited"
    elif min(w.due_at for w in batch) <= now + timedelta(hours=policy.due_soon_hours):
        reason = "due_soon"
    else:
        return None
    full_policy = Policy.model_validate(model.policy)
    job = UnlearningJob(id=str(uuid.uuid4()), model_id=model.id, scenario=scenario,
                        method=full_policy.method, config=full_policy.method_config,
                        status=JobStatus.queued.value, created_at=now)
    db_session.add(job)
    try:
        db_session.flush()
    except IntegrityError:  # another batcher created this model's job first
        db_session.rollback()
        return None
    assigned = cast(CursorResult[Any], db_session.execute(
        update(DeletionTarget)
        .where(DeletionTarget.id.in_([w.target_id for w in batch]),
               DeletionTarget.status == TargetStatus.queued.value,
               DeletionTarget.job_id.is_(None))
        .values(job_id=job.id, updated_at=now)
        .execution_options(synchronize_session=False))).rowcount
    if not assigned:
        db_session.rollback()
        return None
    flows.job_event(db_session, job, "created", model=model.name, scenario=scenario,
                    targets=assigned, reason=reason)
    db_session.commit()
    return job


def mark_dispatched(db_session: Session, job_ids: Iterable[str]) -> None:
    db_session.execute(update(UnlearningJob).where(UnlearningJob.id.in_(list(job_ids)))
                       .values(dispatched_at=utcnow())
                       .execution_options(synchronize_session=False))
    db_session.commit()


# ---- sweeping -------------------------------------------------------------------------------


def requeue_lost(db_session: Session, *, heartbeat_timeout: float) -> list[str]:
    """Jobs whose worker stopped heart-beating go back to `queued` (or fail at the attempt
    cap); returns the ids to dispatch again."""
    cutoff = utcnow() - timedelta(seconds=heartbeat_timeout)
    stale = db_session.scalars(select(UnlearningJob).where(
        UnlearningJob.status.in_(RUNNING), UnlearningJob.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)).all()
    again = []
    for job in stale:
        model = db_session.get(Model, job.model_id)
        assert model is not None
        if job.attempt >= Policy.model_validate(model.policy).max_attempts:
            flows.fail_job(db_session, job, reason=f"worker lost on all {job.attempt} deliveries")
            continue
        job.status, job.phase = JobStatus.queued.value, "requeued: worker lost"
        flows.job_event(db_session, job, "requeued", attempt=job.attempt,
                        last_heartbeat=job.heartbeat_at.isoformat() if job.heartbeat_at
                        else None, worker=job.worker_host)
        again.append(job.id)
    db_session.commit()
    return again


def undispatched(db_session: Session, *, older_than: float) -> list[str]:
    """Queued jobs whose "run" message may have been lost (the broker was down, or it
    restarted empty): send them again; a duplicate delivery is harmless."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    ids = list(db_session.scalars(select(UnlearningJob.id).where(
        UnlearningJob.status == JobStatus.queued.value,
        (UnlearningJob.dispatched_at.is_(None)) | (UnlearningJob.dispatched_at < cutoff))))
    db_session.rollback()
    return ids
