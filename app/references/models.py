"""Reference sets: per-sample statistics of reference models trained on random halves of a
model's training data (docs/methods.md, 'Reference models'), kept so the gate can test each
request.

A set's rows live in ``reference_statistics``: one value per (sample, reference model) where
that model did not train on the sample. No reference model's weights are ever stored. A
statistic row references its sample with ``ON DELETE CASCADE``, and the job that tombstones a
sample deletes its rows in the same transaction.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, BigIntId, JSONType, UTCDateTime, utcnow


class ReferenceStatus(StrEnum):
    queued = "queued"
    running = "running"
    ready = "ready"  # the gate reads the newest ready set of a model
    failed = "failed"
    superseded = "superseded"  # a newer set is ready; its statistics were deleted


ACTIVE_REFERENCE_STATUSES = (ReferenceStatus.queued, ReferenceStatus.running)


class ReferenceSet(Base):
    __tablename__ = "reference_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          index=True)
    # The version served when the set was asked for (the data and recipe it mirrors).
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    n_references: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str | None] = mapped_column(String(64))
    completed: Mapped[int] = mapped_column(Integer, default=0)  # reference models stored
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    requested_by: Mapped[str] = mapped_column(String(128))
    n_train: Mapped[int | None] = mapped_column(Integer)
    n_holdout: Mapped[int | None] = mapped_column(Integer)
    # Wall seconds of each reference model, in index order: the set's cost.
    reference_seconds: Mapped[list[float]] = mapped_column(JSONType, default=list)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReferenceStatistic(Base):
    __tablename__ = "reference_statistics"
    __table_args__ = (
        UniqueConstraint("set_id", "sample_id", "reference_index",
                         name="uq_reference_statistics_set_sample_reference"),
        Index("ix_reference_statistics_sample_id", "sample_id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("reference_sets.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("samples.id",
                                                                 ondelete="CASCADE"))
    reference_index: Mapped[int] = mapped_column(Integer)
    # The logit-scaled true-class confidence of reference model `reference_index` on the
    # sample, which that model did not train on.
    phi: Mapped[float] = mapped_column(Float)


class ReferenceBuild(BaseModel):
    references: int | None = Field(
        default=None, examples=[8],
        description="Reference models to train (a multiple of 4 from 8 to 16); default: the "
                    "policy's `verification.references`.")


class ReferenceSetRead(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 3, "model": "fashion-classifier", "version": 1, "status": "running",
        "references": 8, "completed": 5, "phase": "reference 6/8: train",
        "attempt": 1, "n_train": 2800, "n_holdout": 1200, "statistics": 17200,
        "reference_seconds": [31.2, 30.8, 31.0, 30.5, 31.4], "cost_seconds": 154.9,
        "worker_host": "worker-1", "failure_reason": None,
        "created_at": "2026-12-06T09:00:00Z", "started_at": "2026-12-06T09:00:02Z",
        "finished_at": None}]})

    id: int
    model: str
    version: int | None
    status: ReferenceStatus
    references: int
    completed: int = Field(description="Reference models trained, measured and dropped.")
    phase: str | None
    attempt: int
    n_train: int | None = Field(description="Training samples the references split.")
    n_holdout: int | None
    statistics: int = Field(description="Stored per-sample values (OUT samples only).")
    reference_seconds: list[float]
    cost_seconds: float = Field(description="Wall seconds of all reference models so far.")
    worker_host: str | None
    failure_reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

