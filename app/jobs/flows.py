"""A delivery of an unlearning job, in the order the worker (worker/pipeline.py) lives it:
`start` (claim the job), `heartbeat` and `report_progress` while the method runs,
`fail_requests` for requests whose samples cannot be read, `verifying`, then
`candidate_passed` (publish) or `candidate_failed` (escalate, or fail once no escalation is
left), `complete_unchanged` when nothing of the model was covered; `requeue` and `abandon` are
the ways out. Each is one transaction with its audit events; the rules live here.

Exactly-once publishing rests on three things: a job row is claimed under a row lock (a second
delivery of a running job with a fresh heartbeat backs off; a finished job is never run
again); every write a delivery makes afterwards is fenced by the attempt number it claimed
(`_owned_by`), so a worker the sweeper gave up on (crashed, or cut off from the database and
back later) can no longer touch the job; and publish re-checks both under the same lock inside
the transaction that creates the version, moves the alias and completes the targets."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, case, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.certificates import service as certificates
from app.certificates.service import Signer
from app.core.db import utcnow
from app.datasets.models import Sample
from app.jobs.models import JobStatus, UnlearningJob
from app.jobs.service import FINISHED, RUNNING
from app.models_registry import service as registry
from app.models_registry.artifacts import ArtifactStore, StagedArtifact
from app.models_registry.models import EscalationPolicy, Model, ModelVersion, Policy, VersionStatus
from app.references import service as references
from app.requests import lifecycle
from app.requests.models import DeletionRequest, DeletionTarget, RequestStatus, TargetStatus

log = logging.getLogger(__name__)

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


def job_event(db_session: Session, job: UnlearningJob, what: str, **details: Any) -> None:
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
    job_event(db_session, current, "stale_write_refused", write=write, attempt=attempt,
              current_attempt=current.attempt, status=current.status)
    db_session.commit()
    log.warning("refused %s: %s", write, stale)
    raise stale


# ---- a delivery, in order ------------------------------------------------------------------


def start(db_session: Session, *, job_id: str, worker_host: str, task_id: str | None,
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
        fail_job(db_session, job, reason=f"gave up after {job.attempt} deliveries "
                                         "(the worker was lost each time)")
        return None
    request_ids = lifecycle.move_targets(db_session, job_id=job.id, to=TargetStatus.processing)
    if not request_ids:  # every target was canceled before the job started
        job.status, job.finished_at = JobStatus.canceled.value, now
        job_event(db_session, job, "canceled", reason="no targets left")
        db_session.commit()
        return None
    base = registry.alias_target(db_session, model=model)
    if base is None:
        fail_job(db_session, job, reason="the model has no production version")
        return None
    job.attempt += 1
    job.status, job.phase = JobStatus.running.value, "starting"
    job.worker_host, job.celery_task_id = worker_host, task_id
    job.base_version_id = base.id
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    job_event(db_session, job, "started", attempt=job.attempt, worker=worker_host,
              base_version=base.number)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM)
    db_session.commit()
    return job


def heartbeat(db_session: Session, *, job_id: str, attempt: int) -> bool:
    """Refresh the delivery's heartbeat; False (nothing written) when ``attempt`` no longer
    owns the job."""
    beat = cast(CursorResult[Any], db_session.execute(
        update(UnlearningJob).where(_owned_by(job_id, attempt))
        .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False)))
    db_session.commit()
    return bool(beat.rowcount)


def report_progress(db_session: Session, *, job_id: str, attempt: int, phase: str, step: int,
                    total: int, metrics: dict[str, Any]) -> bool:
    """Write the delivery's progress (a heartbeat too); False (nothing written) when
    ``attempt`` no longer owns the job."""
    percent = 100.0 * step / total if total else 0.0
    written = cast(CursorResult[Any], db_session.execute(
        update(UnlearningJob).where(_owned_by(job_id, attempt))
        .values(phase=phase, step=step, total_steps=total, percent=min(percent, 100.0),
                metrics=metrics, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)))
    db_session.commit()
    return bool(written.rowcount)


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
    job_event(db_session, job, "requests_failed", requests=touched)
    for request_id in touched:
        lifecycle.sync_statuses(db_session, [request_id], actor=SYSTEM,
                                details={"reason": request_reasons[request_id]})
    if not any(t.status in (TargetStatus.processing.value, TargetStatus.verifying.value)
               for t in lifecycle.targets_of(db_session, job_id=job.id)):
        fail_job(db_session, job, reason="none of the batch's requests could be served: "
                                         + "; ".join(sorted(set(request_reasons.values()))))
        return False
    db_session.commit()
    return True


def verifying(db_session: Session, *, job_id: str, attempt: int) -> None:
    job = _lock_delivery(db_session, job_id, attempt, write="begin_verification")
    job.status, job.phase = JobStatus.verifying.value, "verifying"
    request_ids = lifecycle.move_targets(db_session, job_id=job.id, to=TargetStatus.verifying)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM)
    db_session.commit()


def candidate_passed(
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
    """Complete a job on the served version, which stands as the version of record: its
    requests cover no training sample of the model (a subject's holdout or test images, say:
    the version never saw them), or the method left the weights unchanged and passed
    verification where the policy allows it (`publish_unchanged`). The samples are still
    tombstoned and wiped."""
    job, _, base = _lock_for_completion(db_session, job_id, attempt,
                                        write="complete_unchanged")
    _complete(db_session, job, base, forgotten=forgotten, signer=signer, report=report)
    return base


def candidate_failed(
    db_session: Session, *, job_id: str, attempt: int, staged: StagedArtifact,
    store: ArtifactStore, report: dict[str, Any], metrics: dict[str, Any],
    escalation: EscalationPolicy, reason: str, request_reasons: dict[str, str] | None = None,
) -> int | None:
    """The candidate failed verification: it is recorded as `rejected` (never served), and in
    the same transaction the job escalates to the next level ``escalation`` allows, its
    targets back to processing, or, none being left, fails with ``reason`` (each request's
    targets with its own entry in ``request_reasons``, so a requester reads its own request's
    failure and never another client's request ids). Returns the level to run next, or None
    when the job failed."""
    job = _lock_delivery(db_session, job_id, attempt, write="reject_candidate")
    model = db_session.get(Model, job.model_id)
    assert model is not None
    base = db_session.get(ModelVersion, job.base_version_id)
    registry.add_version(db_session, model=model, staged=staged, store=store, actor=SYSTEM,
                         status=VersionStatus.rejected, parent=base, job_id=job.id,
                         metrics=metrics, verification_report=report, commit=False)
    job.report = report
    level = next_escalation(escalation, job.escalation_level)
    if level is None:
        fail_job(db_session, job, reason=reason, report=report, request_reasons=request_reasons)
        return None
    previous = job.escalation_level
    job.escalation_level, job.status, job.phase = level, JobStatus.running.value, "escalating"
    job_event(db_session, job, "escalated", from_level=previous, to_level=level,
              to=ESCALATION_NAMES[level], reasons=report.get("reasons", []))
    request_ids = lifecycle.move_targets(db_session, job_id=job.id,
                                         from_={TargetStatus.verifying},
                                         to=TargetStatus.processing)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM,
                            details={"escalation": ESCALATION_NAMES[level]})
    db_session.commit()
    return level


def next_escalation(escalation: EscalationPolicy, level: int) -> int | None:
    """The escalation level after ``level`` fails verification, or None when none is left:
    1 runs the policy's method with stronger settings, 2 retrains exactly on the retain set."""
    if level == 0 and escalation.stronger_attempt:
        return 1
    if level < 2 and escalation.allow_retrain:
        return 2
    return None


def requeue(db_session: Session, *, job_id: str, attempt: int, reason: str) -> None:
    """The delivery that owns the job sends it back to the queue (its base version changed
    under it)."""
    job = _lock_delivery(db_session, job_id, attempt, write="requeue")
    job.status, job.phase = JobStatus.queued.value, f"requeued: {reason}"
    job_event(db_session, job, "requeued", reason=reason)
    db_session.commit()


def abandon(db_session: Session, *, job_id: str, attempt: int, reason: str) -> None:
    """The delivery that claimed ``attempt`` gives up on an error: the job fails with the
    reason, and so do its targets (an operator may retry)."""
    job = _lock_delivery(db_session, job_id, attempt, write="fail")
    fail_job(db_session, job, reason=reason)


# ---- endings --------------------------------------------------------------------------------


def fail_job(db_session: Session, job: UnlearningJob, *, reason: str,
             report: dict[str, Any] | None = None,
             request_reasons: dict[str, str] | None = None) -> None:
    """End the job, locked by the caller, as failed with ``reason``: its open targets fail
    with it (each request's with its own entry in ``request_reasons``, if any) and
    their requests follow. Commits."""
    job.status, job.finished_at, job.failure_reason = JobStatus.failed.value, utcnow(), reason
    if report is not None:
        job.report = report
    request_ids = lifecycle.move_targets(
        db_session, job_id=job.id, to=TargetStatus.failed,
        values={"failure_reason": _per_request(request_reasons or {}, otherwise=reason)})
    job_event(db_session, job, "failed", reason=reason)
    lifecycle.sync_statuses(db_session, request_ids, actor=SYSTEM, details={"reason": reason})
    db_session.commit()


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
    job_event(db_session, job, "succeeded", version=version.number,
              forgotten_samples=len(forgotten), attempt=job.attempt, worker=job.worker_host)
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
