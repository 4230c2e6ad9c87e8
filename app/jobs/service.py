"""Unlearning jobs: batching queued targets, claiming a delivery, progress, escalation,
failure and the publish transaction. Celery tasks call these; the rules live here.

Exactly-once publishing rests on three things: a job row is claimed under a row lock (a second
delivery of a running job with a fresh heartbeat backs off; a finished job is never run
again); every write a delivery makes afterwards is fenced by the attempt number it claimed
(`_owned_by`), so a worker the sweeper gave up on (crashed, or cut off from the database and
back later) can no longer touch the job; and publish re-checks both under the same lock inside
the transaction that creates the version, moves the alias and completes the targets."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.certificates import service as certificates
from app.certificates.service import Signer
from app.core.db import utcnow
from app.datasets.models import Sample
from app.jobs.models import ACTIVE_JOB_STATUSES, JobRead, JobStatus, UnlearningJob
from app.models_registry import service as registry
from app.models_registry.artifacts import ArtifactStore, StagedArtifact
from app.models_registry.models import Model, ModelVersion, Policy, VersionStatus
from app.references import service as references
from app.requests import lifecycle
from app.requests.models import DeletionRequest, DeletionTarget, RequestStatus, TargetStatus
from unlearning.scenarios import Scenario

log = logging.getLogger(__name__)

ACTIVE = [s.value for s in ACTIVE_JOB_STATUSES]
RUNNING = [JobStatus.running.value, JobStatus.verifying.value, JobStatus.publishing.value]
FINISHED = {JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.canceled.value}
SYSTEM = "system"
ESCALATION_NAMES = {0: "policy method", 1: "stronger settings", 2: "exact retrain"}


class PublishConflict(Exception):
    """The job can no longer publish: this delivery no longer owns it (`StaleAttempt`;
    ``retry`` False), or its base version was replaced while it ran (``retry`` True)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class StaleAttempt(PublishConflict):
    """Fenced: the job no longer runs under the attempt this delivery claimed. It finished,
    or the sweeper requeued it after this worker's heartbeat stopped (a crash, or a network
    partition the worker came back from) and another delivery may own it now. Every write of
    the stale delivery is refused; it must stop without touching the job."""

    def __init__(self, job_id: str, attempt: int, *, now: str) -> None:
        super().__init__(f"job {job_id} is no longer delivery {attempt}'s: {now}", retry=False)
        self.job_id, self.attempt = job_id, attempt


def _job_event(db_session: Session, job: UnlearningJob, what: str, **details: Any) -> None:
    audit.record(db_session, actor=SYSTEM, action=f"job.{what}", entity_type="job",
                 entity_id=job.id, details=details)


def _lock(db_session: Session, job_id: str) -> UnlearningJob | None:
    return db_session.scalar(select(UnlearningJob).where(UnlearningJob.id == job_id)
                             .with_for_update())


def _owned_by(job_id: str, attempt: int) -> ColumnElement[bool]:
    """The fencing rule: a delivery may write to its job only while the job still runs under
    the attempt number that delivery claimed. Once the sweeper has requeued the job (and a
    later claim has counted it up), the old delivery's writes match no row."""
    return and_(UnlearningJob.id == job_id, UnlearningJob.attempt == attempt,
                UnlearningJob.status.in_(RUNNING))


def _lock_delivery(db_session: Session, job_id: str, attempt: int, *, write: str
                   ) -> UnlearningJob:
    """The job, row-locked for ``write`` by the delivery that claimed ``attempt``; when that
    delivery no longer owns it, the refusal is audited and `StaleAttempt` raised."""
    job = db_session.scalar(select(UnlearningJob).where(_owned_by(job_id, attempt))
                            .with_for_update().execution_options(populate_existing=True))
    if job is not None:
        return job
    db_session.rollback()
    current = db_session.get(UnlearningJob, job_id)
    if current is None:
        raise StaleAttempt(job_id, attempt, now="the job is gone")
    stale = StaleAttempt(job_id, attempt, now=f"it is {current.status} as delivery "
                                              f"{current.attempt} on {current.worker_host}")
    _job_event(db_session, current, "stale_write_refused", write=write, attempt=attempt,
               current_attempt=current.attempt, status=current.status)
    db_session.commit()
    log.warning("refused %s: %s", write, stale)
    raise stale


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
    assigned = db_session.execute(
        update(DeletionTarget)
        .where(DeletionTarget.id.in_([w.target_id for w in batch]),
               DeletionTarget.status == TargetStatus.queued.value,
               DeletionTarget.job_id.is_(None))
        .values(job_id=job.id, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    if not assigned:
        db_session.rollback()
        return None
    _job_event(db_session, job, "created", model=model.name, scenario=scenario,
               targets=assigned, reason=reason)
    db_session.commit()
    return job


def request_traces(db_session: Session, job_id: str) -> list[tuple[str, str | None]]:
    """(request id, the X-Request-ID it arrived with) for each request the job carries."""
    rows = db_session.execute(
        select(DeletionRequest.id, DeletionRequest.trace_id)
        .join(DeletionTarget, DeletionTarget.request_id == DeletionRequest.id)
        .where(DeletionTarget.job_id == job_id).order_by(DeletionRequest.received_at))
    return [(request_id, trace) for request_id, trace in rows]


def mark_dispatched(db_session: Session, job_ids: Iterable[str]) -> None:
    db_session.execute(update(UnlearningJob).where(UnlearningJob.id.in_(list(job_ids)))
                       .values(dispatched_at=utcnow())
                       .execution_options(synchronize_session=False))
    db_session.commit()


# ---- a delivery of a job ------------------------------------------------------------------


def claim(db_session: Session, *, job_id: str, worker_host: str, task_id: str | None,
          heartbeat_timeout: float) -> UnlearningJob | None:
    """Take this delivery of a job, or return None if it must not run: finished already,
    running elsewhere with a live heartbeat, out of attempts, or nothing left to forget."""
    now = utcnow()
    job = _lock(db_session, job_id)
    if job is None or job.status in FINISHED:
        db_session.rollback()
        return None
    if (job.status in RUNNING and job.heartbeat_at is not None
            and now - job.heartbeat_at < timedelta(seconds=heartbeat_timeout)):
        db_session.rollback()
        return None  # a duplicate delivery while the first is alive
    model = db_session.get(Model, job.model_id)
    assert model is not None
    policy = Policy.model_validate(model.policy)
    if job.attempt >= policy.max_attempts:
        _fail(db_session, job, reason=f"gave up after {job.attempt} deliveries "
                                      "(the worker was lost each time)")
        return None
    request_ids = lifecycle.move_targets(db_session, job_id=job.id, to=TargetStatus.processing)
    if not request_ids:  # every target was canceled before the job started
        job.status, job.finished_at = JobStatus.canceled.value, now
        _job_event(db_session, job, "canceled", reason="no targets left")
        db_session.commit()
        return None
    base = registry.alias_target(db_session, model=model)
    if base is None:
        _fail(db_session, job, reason="the model has no production version")
        return None
    job.attempt += 1
    job.status, job.phase = JobStatus.running.value, "starting"
    job.worker_host, job.celery_task_id = worker_host, task_id
    job.base_version_id = base.id
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    _job_event(db_session, job, "started", attempt=job.attempt, worker=worker_host,
               base_version=base.number)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM)
    db_session.commit()
    return job


def heartbeat(db_session: Session, *, job_id: str, attempt: int) -> bool:
    """Refresh the delivery's heartbeat; False (nothing written) when ``attempt`` no longer
    owns the job."""
    beat = db_session.execute(update(UnlearningJob).where(_owned_by(job_id, attempt))
                              .values(heartbeat_at=utcnow())
                              .execution_options(synchronize_session=False))
    db_session.commit()
    return bool(beat.rowcount)


def report_progress(db_session: Session, *, job_id: str, attempt: int, phase: str, step: int,
                    total: int, metrics: dict[str, Any]) -> bool:
    """Write the delivery's progress (a heartbeat too); False (nothing written) when
    ``attempt`` no longer owns the job."""
    percent = 100.0 * step / total if total else 0.0
    written = db_session.execute(update(UnlearningJob).where(_owned_by(job_id, attempt))
                                 .values(phase=phase, step=step, total_steps=total,
                                         percent=min(percent, 100.0), metrics=metrics,
                                         heartbeat_at=utcnow())
                                 .execution_options(synchronize_session=False))
    db_session.commit()
    return bool(written.rowcount)


def is_canceled(db_session: Session, *, job_id: str) -> bool:
    status = db_session.scalar(select(UnlearningJob.status).where(UnlearningJob.id == job_id))
    db_session.rollback()
    return status == JobStatus.canceled.value


def begin_verification(db_session: Session, *, job_id: str, attempt: int) -> None:
    job = _lock_delivery(db_session, job_id, attempt, write="begin_verification")
    job.status, job.phase = JobStatus.verifying.value, "verifying"
    request_ids = lifecycle.move_targets(db_session, job_id=job.id, to=TargetStatus.verifying)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM)
    db_session.commit()


def next_escalation(policy: Policy, level: int) -> int | None:
    """The escalation level after ``level`` fails verification, or None when none is left."""
    if level == 0 and policy.escalation.stronger_attempt:
        return 1
    if level < 2 and policy.escalation.allow_retrain:
        return 2
    return None


def reject_candidate(
    db_session: Session, *, job_id: str, attempt: int, staged: StagedArtifact,
    store: ArtifactStore, report: dict[str, Any], metrics: dict[str, Any],
) -> ModelVersion:
    """Record a candidate that failed verification: stored as `rejected`, never served."""
    job = _lock_delivery(db_session, job_id, attempt, write="reject_candidate")
    model = db_session.get(Model, job.model_id)
    assert model is not None
    base = db_session.get(ModelVersion, job.base_version_id)
    version = registry.add_version(db_session, model=model, staged=staged, store=store,
                                   actor=SYSTEM, status=VersionStatus.rejected, parent=base,
                                   job_id=job.id, metrics=metrics,
                                   verification_report=report, commit=False)
    job.report = report
    db_session.commit()
    return version


def escalate(db_session: Session, *, job_id: str, attempt: int, level: int,
             report: dict[str, Any]) -> None:
    job = _lock_delivery(db_session, job_id, attempt, write="escalate")
    previous = job.escalation_level
    job.escalation_level, job.status, job.phase = level, JobStatus.running.value, "escalating"
    job.report = report
    _job_event(db_session, job, "escalated", from_level=previous, to_level=level,
               to=ESCALATION_NAMES[level], reasons=report.get("reasons", []))
    request_ids = lifecycle.move_targets(db_session, job_id=job.id,
                                         from_={TargetStatus.verifying},
                                         to=TargetStatus.processing)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM,
                            details={"escalation": ESCALATION_NAMES[level]})
    db_session.commit()


def fail(db_session: Session, *, job_id: str, attempt: int, reason: str,
         report: dict[str, Any] | None = None,
         request_reasons: dict[str, str] | None = None) -> None:
    """The delivery that claimed ``attempt`` ends the job as failed; its targets fail with
    the reason (an operator may retry). ``request_reasons``: the reason each request's
    targets show instead, so a requester reads its own request's failures and never another
    client's request ids."""
    job = _lock_delivery(db_session, job_id, attempt, write="fail")
    _fail(db_session, job, reason=reason, report=report, request_reasons=request_reasons)


def fail_requests(db_session: Session, *, job_id: str, attempt: int,
                  request_reasons: dict[str, str]) -> bool:
    """Fail some of the job's requests, each with its own reason, and go on with the others:
    a request whose samples cannot be read (a file lost from the store after it was accepted)
    must not hold back the rest of its batch. Returns whether the job goes on; it fails when
    none of its requests is left."""
    job = _lock_delivery(db_session, job_id, attempt, write="fail_requests")
    touched = lifecycle.move_targets(
        db_session, job_id=job.id, request_ids=list(request_reasons), to=TargetStatus.failed,
        from_={TargetStatus.processing, TargetStatus.verifying},
        values={"failure_reason": _per_request(request_reasons, otherwise=None)})
    _job_event(db_session, job, "requests_failed", requests=touched)
    for request_id in touched:
        lifecycle.sync_statuses(db_session, [request_id], actor=SYSTEM,
                                details={"reason": request_reasons[request_id]})
    if not any(t.status in (TargetStatus.processing.value, TargetStatus.verifying.value)
               for t in lifecycle.targets_of(db_session, job_id=job.id)):
        _fail(db_session, job, reason="none of the batch's requests could be served: "
                                      + "; ".join(sorted(set(request_reasons.values()))))
        return False
    db_session.commit()
    return True


def _fail(db_session: Session, job: UnlearningJob, *, reason: str,
          report: dict[str, Any] | None = None,
          request_reasons: dict[str, str] | None = None) -> None:
    job.status, job.finished_at, job.failure_reason = JobStatus.failed.value, utcnow(), reason
    if report is not None:
        job.report = report
    request_ids = lifecycle.move_targets(
        db_session, job_id=job.id, to=TargetStatus.failed,
        values={"failure_reason": _per_request(request_reasons or {}, otherwise=reason)})
    _job_event(db_session, job, "failed", reason=reason)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM, details={"reason": reason})
    db_session.commit()


def publish(
    db_session: Session, *, job_id: str, attempt: int, staged: StagedArtifact,
    store: ArtifactStore, signer: Signer, report: dict[str, Any], metrics: dict[str, Any],
    forgotten: dict[int, str],
) -> ModelVersion:
    """One transaction: the version, `production` moved to it (the base superseded), targets
    completed, samples tombstoned, certificates issued, audit events, the job succeeded.
    Only the delivery that owns the job (``attempt``) may publish; a stale one gets
    `StaleAttempt` and ``staged`` is left for it to discard.

    ``forgotten`` maps each forgotten sample id to the request that asked for it."""
    job, model, base = _lock_for_completion(db_session, job_id, attempt, write="publish")
    job.status, job.phase = JobStatus.publishing.value, "publishing"
    version = registry.add_version(db_session, model=model, staged=staged, store=store,
                                   actor=SYSTEM, parent=base, job_id=job.id, metrics=metrics,
                                   verification_report=report, commit=False)
    registry.set_alias(db_session, model=model, alias="production", number=version.number,
                       actor=SYSTEM, commit=False)
    _complete(db_session, job, version, forgotten=forgotten, signer=signer, report=report)
    return version


def complete_unchanged(db_session: Session, *, job_id: str, attempt: int, signer: Signer,
                       report: dict[str, Any], forgotten: dict[int, str]) -> ModelVersion:
    """Complete a job whose requests cover no training sample of the model (a subject's
    holdout or test images, say): the served version never saw them, so it stands as the
    version of record; the samples are still tombstoned and wiped."""
    job, _, base = _lock_for_completion(db_session, job_id, attempt,
                                        write="complete_unchanged")
    _complete(db_session, job, base, forgotten=forgotten, signer=signer, report=report)
    return base


def _lock_for_completion(db_session: Session, job_id: str, attempt: int, *, write: str
                         ) -> tuple[UnlearningJob, Model, ModelVersion]:
    job = _lock_delivery(db_session, job_id, attempt, write=write)
    model = db_session.get(Model, job.model_id)
    base = db_session.get(ModelVersion, job.base_version_id)
    current = registry.alias_target(db_session, model=model) if model else None
    if model is None or base is None or current is None or current.id != base.id:
        db_session.rollback()
        raise PublishConflict("the production version changed while the job ran", retry=True)
    return job, model, base


def _complete(db_session: Session, job: UnlearningJob, version: ModelVersion, *,
              forgotten: dict[int, str], signer: Signer, report: dict[str, Any]) -> None:
    now = utcnow()
    request_ids = lifecycle.move_targets(db_session, job_id=job.id, to=TargetStatus.completed,
                                         values={"version_id": version.id})
    for sample_ids, request_id in _by_request(forgotten):
        db_session.execute(update(Sample).where(Sample.id.in_(sample_ids),
                                                Sample.forgotten_at.is_(None))
                           .values(forgotten_at=now, forgotten_by_request=request_id)
                           .execution_options(synchronize_session=False))
    # a forgotten sample's reference statistics go in the same transaction as its tombstone
    references.erase_samples(db_session, list(forgotten))
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM,
                            details={"version": version.number})
    for request_id in request_ids:
        request = db_session.get(DeletionRequest, request_id)
        if request is not None and request.status == RequestStatus.completed:
            certificates.issue(db_session, request=request, signer=signer)
    job.status, job.phase, job.percent = JobStatus.succeeded.value, "done", 100.0
    job.finished_at, job.report = now, report
    _job_event(db_session, job, "succeeded", version=version.number,
               forgotten_samples=len(forgotten), attempt=job.attempt, worker=job.worker_host)
    db_session.commit()


def requeue(db_session: Session, *, job_id: str, attempt: int, reason: str) -> None:
    """The delivery that owns the job sends it back to the queue (its base version changed
    under it)."""
    job = _lock_delivery(db_session, job_id, attempt, write="requeue")
    job.status, job.phase = JobStatus.queued.value, f"requeued: {reason}"
    _job_event(db_session, job, "requeued", reason=reason)
    db_session.commit()


def _per_request(reasons: dict[str, str], *, otherwise: str | None) -> Any:
    """A target's failure reason: its request's own where ``reasons`` has one (a requester
    reads its own request's failure, never another client's request ids), else
    ``otherwise``; as one SQL expression, so one UPDATE writes them all."""
    if not reasons:
        return otherwise
    return case(reasons, value=DeletionTarget.request_id, else_=otherwise)


def _by_request(forgotten: dict[int, str]) -> list[tuple[list[int], str]]:
    grouped: dict[str, list[int]] = defaultdict(list)
    for sample_id, request_id in forgotten.items():
        grouped[request_id].append(sample_id)
    return [(ids, request_id) for request_id, ids in grouped.items()]


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
            _fail(db_session, job, reason=f"worker lost on all {job.attempt} deliveries")
            continue
        job.status, job.phase = JobStatus.queued.value, "requeued: worker lost"
        _job_event(db_session, job, "requeued", attempt=job.attempt,
                   last_heartbeat=job.heartbeat_at.isoformat() if job.heartbeat_at else None,
                   worker=job.worker_host)
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


# ---- reads ----------------------------------------------------------------------------------


def get(db_session: Session, *, job_id: str) -> UnlearningJob | None:
    return db_session.get(UnlearningJob, job_id)


def to_read(db_session: Session, job: UnlearningJob) -> JobRead:
    model = db_session.get(Model, job.model_id)
    base = db_session.get(ModelVersion, job.base_version_id) if job.base_version_id else None
    result = db_session.scalar(select(ModelVersion.number).where(
        ModelVersion.job_id == job.id, ModelVersion.status != VersionStatus.rejected.value))
    return JobRead(
        id=job.id, model=model.name if model else "?",
        scenario=Scenario.from_dict(job.scenario).label(), method=job.method,
        status=JobStatus(job.status), attempt=job.attempt, escalation_level=job.escalation_level,
        phase=job.phase, percent=job.percent, step=job.step, total_steps=job.total_steps,
        metrics=job.metrics or {}, report=job.report, worker_host=job.worker_host,
        base_version=base.number if base else None, result_version=result,
        request_ids=sorted({t.request_id for t in lifecycle.targets_of(db_session,
                                                                     job_id=job.id)}),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at, failure_reason=job.failure_reason)


def list_recent(db_session: Session, *, model_id: int | None = None, limit: int = 50
                ) -> list[UnlearningJob]:
    query = select(UnlearningJob)
    if model_id is not None:
        query = query.where(UnlearningJob.model_id == model_id)
    return list(db_session.scalars(query.order_by(UnlearningJob.created_at.desc()).limit(limit)))


def list_filtered(db_session: Session, *, model_id: int | None = None,
                  statuses: Iterable[str] | None = None, limit: int = 50
                  ) -> list[UnlearningJob]:
    """Newest first, optionally of one model and in some statuses."""
    query = select(UnlearningJob)
    if model_id is not None:
        query = query.where(UnlearningJob.model_id == model_id)
    if statuses is not None:
        query = query.where(UnlearningJob.status.in_(list(statuses)))
    return list(db_session.scalars(query.order_by(UnlearningJob.created_at.desc(),
                                                  UnlearningJob.id).limit(limit)))


def count_by_status(db_session: Session) -> dict[str, int]:
    """Jobs per status, every status present (zero where none)."""
    counts = {status.value: 0 for status in JobStatus}
    rows = db_session.execute(select(UnlearningJob.status, func.count())
                              .group_by(UnlearningJob.status))
    counts.update({status: count for status, count in rows})
    return counts


def finished_durations(db_session: Session) -> list[tuple[str, str, float | None]]:
    """(model, final status, seconds from first start to finish) of every finished job; None
    for a job that finished without starting (canceled or failed while queued)."""
    rows = db_session.execute(
        select(Model.name, UnlearningJob.status, UnlearningJob.started_at,
               UnlearningJob.finished_at)
        .join(Model, Model.id == UnlearningJob.model_id)
        .where(UnlearningJob.status.in_(sorted(FINISHED))))
    return [(name, status, (finished - started).total_seconds()
             if started is not None and finished is not None else None)
            for name, status, started, finished in rows]
