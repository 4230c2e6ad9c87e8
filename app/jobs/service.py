"""Unlearning jobs as they are read: one job, pages of them, counts and durations, the
requests a job carries. What a delivery of a job does is in flows.py; batching, dispatch and
the sweeps are in scheduled.py."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.models import ACTIVE_JOB_STATUSES, JobRead, JobStatus, UnlearningJob
from app.models_registry.models import Model, ModelVersion, VersionStatus
from app.requests import lifecycle
from app.requests.models import DeletionRequest, DeletionTarget
from unlearning.scenarios import Scenario

# Job statuses by what they say of the job (flows.py and scheduled.py select by them too).
ACTIVE = [s.value for s in ACTIVE_JOB_STATUSES]
RUNNING = [JobStatus.running.value, JobStatus.verifying.value, JobStatus.publishing.value]
FINISHED = {JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.canceled.value}


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


def request_traces(db_session: Session, job_id: str) -> list[tuple[str, str | None]]:
    """(request id, the X-Request-ID it arrived with) for each request the job carries."""
    rows = db_session.execute(
        select(DeletionRequest.id, DeletionRequest.trace_id)
        .join(DeletionTarget, DeletionTarget.request_id == DeletionRequest.id)
        .where(DeletionTarget.job_id == job_id).order_by(DeletionRequest.received_at))
    return [(request_id, trace) for request_id, trace in rows]


def is_canceled(db_session: Session, *, job_id: str) -> bool:
    status = db_session.scalar(select(UnlearningJob.status).where(UnlearningJob.id == job_id))
    db_session.rollback()
    return status == JobStatus.canceled.value
