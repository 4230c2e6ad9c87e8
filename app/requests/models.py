"""Deletion requests (GDPR Art. 17) and their per-model targets."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, JSONType, UTCDateTime, utcnow


class RequestKind(StrEnum):
    subject = "subject"
    samples = "samples"
    class_ = "class"
    backdoor = "backdoor"


class RequestStatus(StrEnum):
    received = "received"
    awaiting_approval = "awaiting_approval"
    queued = "queued"
    processing = "processing"
    verifying = "verifying"
    completed = "completed"
    failed = "failed"
    canceled = "canceled"
    rejected = "rejected"


TERMINAL = {RequestStatus.completed, RequestStatus.canceled, RequestStatus.rejected}
# ``failed`` is not terminal: an operator may retry it.
OPEN = set(RequestStatus) - TERMINAL


class TargetStatus(StrEnum):
    awaiting_approval = "awaiting_approval"
    queued = "queued"
    processing = "processing"
    verifying = "verifying"
    completed = "completed"
    failed = "failed"
    canceled = "canceled"
    denied = "denied"


class Outcome(StrEnum):
    forgotten = "forgotten"
    no_data = "no_data"
    denied = "denied"
    canceled = "canceled"
    failed = "failed"


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    __table_args__ = (
        UniqueConstraint("client_id", "idempotency_key"),
        Index("ix_deletion_requests_client_received", "client_id", "received_at"),
        Index("ix_deletion_requests_status_due", "status", "due_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(16))
    subject_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    # What the client asked for, minus the raw subject reference (only its hash is kept).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    model_scope: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # The X-Request-ID it arrived with: the worker logs its job steps under it.
    trace_id: Mapped[str | None] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24))
    outcome: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    awaiting_approval_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    verifying_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rejected_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeletionTarget(Base):
    """One model a request applies to; each has its own status and resulting version."""

    __tablename__ = "deletion_targets"
    __table_args__ = (
        UniqueConstraint("request_id", "model_id"),
        Index("ix_deletion_targets_model_status", "model_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(24))
    # The engine's scenario as JSON (unlearning.scenarios.Scenario.to_dict()): targets with
    # equal scenarios may share a job (subject and sample requests alike are `subset`; a
    # class, or a backdoor's trigger and poisoned label, each get their own jobs).
    scenario: Mapped[dict[str, Any]] = mapped_column(JSONType)
    sample_count: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("unlearning_jobs.id", ondelete="SET NULL"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---- API schemas --------------------------------------------------------------------------

SampleKeys = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                       Field(min_length=1, max_length=10_000)]
ModelName = Annotated[str | None, Field(max_length=64, examples=["fashion-classifier"],
                                        description="Limit the request to one model.")]


class SubjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["subject"]
    subject_ref: str = Field(min_length=1, max_length=256, examples=["customer-4711"],
                             description="Your identifier of the data subject; stored hashed.")
    model: ModelName = None


class SamplesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["samples"]
    sample_keys: SampleKeys
    model: ModelName = None


class ClassRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["class"]
    class_label: int = Field(ge=0, le=1_000_000)
    model: str = Field(max_length=64, description="Class forgetting is per model.")


class TriggerPatch(BaseModel):
    """A BadNets-style patch trigger; given this way, verification measures the attack
    success rate of the backdoor before and after."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(default=3, ge=1, le=64)
    value: int = Field(default=255, ge=0, le=255)
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    margin: int = Field(default=1, ge=0, le=64)


class BackdoorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["backdoor"]
    sample_keys: SampleKeys = Field(description="The poisoned samples.")
    trigger: TriggerPatch | Annotated[str, Field(max_length=2000)] | None = Field(
        default=None, description="The trigger: a patch spec (lets verification measure the "
        "attack success rate) or a free-text description.",
        examples=[{"size": 3, "value": 255, "corner": "bottom-right", "margin": 1}])
    model: ModelName = None


DeletionRequestCreate = Annotated[
    SubjectRequest | SamplesRequest | ClassRequest | BackdoorRequest,
    Field(discriminator="kind"),
]

CREATE_EXAMPLES = {
    "subject": {"summary": "Everything held about one data subject",
                "value": {"kind": "subject", "subject_ref": "customer-4711"}},
    "samples": {"summary": "Named training samples",
                "value": {"kind": "samples", "sample_keys": ["img-000017", "img-000123"],
                          "model": "fashion-classifier"}},
    "class": {"summary": "A whole class",
              "value": {"kind": "class", "class_label": 3, "model": "fashion-classifier"}},
    "backdoor": {"summary": "Poisoned samples and their trigger",
                 "value": {"kind": "backdoor", "sample_keys": ["img-000999"],
                           "trigger": {"size": 3, "value": 255, "corner": "bottom-right"},
                           "model": "fashion-classifier"}},
}


class TargetRead(BaseModel):
    model: str
    status: TargetStatus
    scenario: str
    sample_count: int
    job_id: str | None
    version: int | None = Field(description="The published version that forgot the data.")
    failure_reason: str | None
    waiting_for: str | None = Field(
        default=None, description="Why a queued target is not being batched yet (the model "
                                  "has no reference statistics and its policy requires them). "
                                  "Filled on reads (GET); the 202 intake answer leaves it "
                                  "null to keep intake's transaction short.")


class DeletionRequestRead(BaseModel):
    id: str
    client_id: str
    kind: RequestKind
    status: RequestStatus
    outcome: Outcome | None
    reason: str | None
    model: str | None = Field(description="The model scope given at intake, if any.")
    payload: dict[str, Any]
    targets: list[TargetRead]
    received_at: datetime
    due_at: datetime
    days_left: int | None = Field(description="Whole days until due (open requests only).")
    overdue: bool
    queued_at: datetime | None
    processing_at: datetime | None
    verifying_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    canceled_at: datetime | None
    rejected_at: datetime | None
    updated_at: datetime


class DeletionRequestPage(BaseModel):
    items: list[DeletionRequestRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class BulkCreate(BaseModel):
    requests: list[DeletionRequestCreate] = Field(min_length=1, max_length=100)


class BulkFailure(BaseModel):
    index: int
    status: int
    title: str
    detail: str


class BulkResult(BaseModel):
    succeeded: list[DeletionRequestRead]
    failed: list[BulkFailure]


class DenyBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)
