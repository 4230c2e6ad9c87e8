"""Unlearning jobs: one batch of deletion targets for one model, with live progress."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, JSONType, UTCDateTime, utcnow


class JobStatus(StrEnum):
    queued = "queued"  # created by the batcher, waiting for a worker
    running = "running"  # unlearning
    verifying = "verifying"  # the membership-inference gate
    publishing = "publishing"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class JobOutcome(StrEnum):
    """What one delivery of a job did (the worker's answer; the Celery task branches on it)."""

    skipped = "skipped"  # not claimed: finished, running elsewhere, or nothing left
    published = "published"  # a verified version was published
    unchanged = "unchanged"  # nothing of the model to forget: the served version stands
    failed = "failed"  # the job failed; its requests say why
    requeued = "requeued"  # the base version moved: the job goes round again
    superseded = "superseded"  # fenced: another delivery took the job while this one ran


ACTIVE_JOB_STATUSES = (JobStatus.queued, JobStatus.running, JobStatus.verifying,
                       JobStatus.publishing)
_ACTIVE_SQL = "status IN ('queued', 'running', 'verifying', 'publishing')"


class UnlearningJob(Base):
    __tablename__ = "unlearning_jobs"
    __table_args__ = (
        # One active job per model, so versions form a line.
        Index("uq_unlearning_jobs_one_active_per_model", "model_id", unique=True,
              postgresql_where=text(_ACTIVE_SQL), sqlite_where=text(_ACTIVE_SQL)),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          index=True)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    scenario: Mapped[dict[str, Any]] = mapped_column(JSONType)  # Scenario.to_dict()
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    # Deliveries so far (a worker lost mid-job means another delivery), capped by policy.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # 0: the policy's method; 1: stronger settings; 2: exact retrain.
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str | None] = mapped_column(String(32))
    percent: Mapped[float] = mapped_column(default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    # Last time "run job" was handed to the broker: the sweeper re-sends stale ones.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_reason: Mapped[str | None] = mapped_column(Text)


class JobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model: str
    scenario: str
    method: str
    status: JobStatus
    attempt: int
    escalation_level: int
    phase: str | None
    percent: float = Field(ge=0, le=100)
    step: int
    total_steps: int
    metrics: dict[str, Any]
    report: dict[str, Any] | None
    worker_host: str | None
    base_version: int | None
    result_version: int | None
    request_ids: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    failure_reason: str | None
