"""Deletion requests in aggregate: what the dashboard's overview and the metrics endpoint
(app/observability/metrics.py) count."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from app.models_registry.models import Model
from app.requests.models import OPEN, DeletionRequest, DeletionTarget, RequestStatus, TargetStatus


def count_by_status(db_session: Session) -> dict[str, int]:
    """Requests per status, every status present (zero where none)."""
    counts = {status.value: 0 for status in RequestStatus}
    rows = db_session.execute(select(DeletionRequest.status, func.count())
                              .group_by(DeletionRequest.status))
    counts.update({status: count for status, count in rows})
    return counts


def deadline_counts(db_session: Session, *, now: datetime, soon: timedelta) -> tuple[int, int]:
    """Open requests past their due date, and those due within ``soon`` but not yet past it."""
    open_ = DeletionRequest.status.in_([s.value for s in OPEN])
    count = select(func.count()).select_from(DeletionRequest)
    overdue = db_session.scalar(count.where(open_, DeletionRequest.due_at < now)) or 0
    due_soon = db_session.scalar(count.where(open_, DeletionRequest.due_at >= now,
                                             DeletionRequest.due_at < now + soon)) or 0
    return overdue, due_soon


def open_by_due_date(db_session: Session, *, limit: int = 20) -> list[DeletionRequest]:
    """Open requests, the nearest deadline (or the longest overdue) first."""
    return list(db_session.scalars(
        select(DeletionRequest).where(DeletionRequest.status.in_([s.value for s in OPEN]))
        .order_by(DeletionRequest.due_at, DeletionRequest.id).limit(limit)))


def received_per_day(db_session: Session, *, since: datetime) -> dict[date, int]:
    """Requests received per UTC day since ``since``; days with none are absent."""
    column = DeletionRequest.received_at
    # PostgreSQL stores timestamptz (date() would use the session's zone); SQLite stores UTC
    # text, whose date part date() takes as is.
    day = (func.date(func.timezone("UTC", column))
           if db_session.get_bind().dialect.name == "postgresql" else func.date(column))
    rows = db_session.execute(select(day, func.count()).where(column >= since).group_by(day))
    return {value if isinstance(value, date) else date.fromisoformat(value): count
            for value, count in rows}


def queued_targets_per_model(db_session: Session) -> dict[str, int]:
    """Targets waiting for a batch (queued, no job yet) per model: the queue depth."""
    waiting = and_(DeletionTarget.model_id == Model.id,
                   DeletionTarget.status == TargetStatus.queued.value,
                   DeletionTarget.job_id.is_(None))
    rows = db_session.execute(select(Model.name, func.count(DeletionTarget.id))
                              .outerjoin(DeletionTarget, waiting).group_by(Model.name))
    return {name: count for name, count in rows}
