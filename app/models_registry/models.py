"""The model registry (MLflow-shaped): models, their numbered versions and aliases."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, JSONType, UTCDateTime, utcnow
from app.core.fields import VersionNumber
from app.datasets.models import NAME_PATTERN
from app.models_registry.engine_bridge import check_reference_count

PRODUCTION = "production"


class VersionStatus(StrEnum):
    candidate = "candidate"  # uploaded or produced, not (yet) served
    published = "published"  # the version the production alias points to
    rejected = "rejected"  # failed verification: never served
    superseded = "superseded"  # was published; still holds data erased since
    purged = "purged"  # superseded and its weights deleted


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    architecture: Mapped[dict[str, Any]] = mapped_column(JSONType)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    artifact_uri: Mapped[str | None] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    verification_report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The job that produced it. Not a foreign key: jobs point at their base version, and a
    # cycle of constraints cannot be created on SQLite.
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    model_id: Mapped[int] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


# ---- policy: how a model's deletion requests are batched, unlearned and verified ----------


class BatchingPolicy(BaseModel):
    max_batch: int = Field(default=32, ge=1, le=10_000,
                           description="Flush a batch when this many requests wait.")
    max_wait_seconds: int = Field(default=600, ge=0, le=30 * 86400,
                                  description="Flush when the oldest request waited this long.")
    due_soon_hours: int = Field(default=72, ge=0, le=24 * 90,
                                description="Flush at once when a request is due this soon.")


class VerificationPolicy(BaseModel):
    min_indiscernibility: float = Field(
        default=0.9, ge=0, le=1,
        description="1 - |MIA accuracy - 0.5| / 0.5 on forget vs. the audit slice (unseen "
                    "samples the method never saw) must reach this.")
    max_test_accuracy_drop: float = Field(
        default=0.02, ge=0, le=1, description="Absolute drop against the base version.")
    max_forget_class_accuracy: float = Field(default=0.05, ge=0, le=1)
    max_attack_success_rate: float = Field(default=0.10, ge=0, le=1)
    min_ks_p_value: float = Field(
        default=0.01, ge=0, le=1, validation_alias=AliasChoices("min_ks_p_value", "min_ks_pvalue"),
        description="KS test (second check for small forget sets): forget losses must look "
                    "like holdout losses.")
    alpha: float = Field(
        default=0.05, gt=0, lt=1,
        description="Per-request membership test: false-discovery rate (Benjamini-Hochberg) "
                    "across a batch's requests.")
    references: int = Field(
        default=8, description="Reference models per reference set: a multiple of 4 from 8 "
                               "to 16 (half for the gate, half for the method). 8 costs about "
                               "4 trainings of the original; 16 doubled that without "
                               "measurably more power (benchmarks/results/gate-power-*).")
    require_references: bool = Field(
        default=True, description="Keep requests queued until the served version has "
                                  "reference statistics (per-sample evidence).")
    build_references_on_register: bool = Field(
        default=True, description="Start a reference job when a version is uploaded.")

    @field_validator("references")
    @classmethod
    def _references(cls, k: int) -> int:
        return check_reference_count(k)


class EscalationPolicy(BaseModel):
    stronger_attempt: bool = Field(default=True,
                                   description="Retry once with stronger method settings.")
    allow_retrain: bool = Field(default=True,
                                description="Then retrain from scratch on the retain set.")


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(default="match", examples=["match"])
    method_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the method's defaults: fields of its config, each set to a "
                    "value of the field's type (an unknown field or a wrong type: 422).")
    min_steps: int = Field(
        default=10, ge=1, le=100_000,
        description="Optimiser steps a method that stops early (`match`) takes at least, even "
                    "when the batch's samples already look unseen before any step, so every "
                    "published version has had the method applied. Unused with "
                    "`publish_unchanged`.")
    publish_unchanged: bool = Field(
        default=False,
        description="Let a method that finds the batch already indistinguishable return the "
                    "weights unchanged: the job then completes on the served version (no new "
                    "version), its report saying the weights are unchanged. Off by default: a "
                    "population attack has little power on a handful of samples, so 'already "
                    "indistinguishable' is weak evidence on its own.")
    due_days: int = Field(default=30, ge=1, le=90,
                          description="Days from receipt to the legal deadline.")
    require_approval: bool = False
    batching: BatchingPolicy = Field(default_factory=BatchingPolicy)
    verification: VerificationPolicy = Field(default_factory=VerificationPolicy)
    escalation: EscalationPolicy = Field(default_factory=EscalationPolicy)
    max_attempts: int = Field(default=3, ge=1, le=20,
                              description="Deliveries of a job before its targets fail.")
    grace_days: int = Field(
        default=7, ge=0, le=365,
        description="Days the weights of a superseded version that still holds erased data, "
                    "and of a rejected candidate, are kept before the purge deletes them: "
                    "time to compare them with their successor and investigate. Never past "
                    "the due date of an erased request whose data they still hold (the purge "
                    "comes at whichever is first), so the deadline (`due_days`) is kept. A "
                    "version that predates no erasure is never purged and stays available to "
                    "roll back to. 0: at the next purge.")
    scenario_clients: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=100, examples=[["acme-forensics"]],
        description="Clients (an API key's `client_id`) whose requester keys may send "
                    "`class` and `backdoor` requests for this model. Those change what the "
                    "model does for everyone: operator and admin keys may always send them, "
                    "requester keys only when named here.")
    training_recipe: dict[str, Any] = Field(
        default_factory=dict, examples=[{"epochs": 30, "lr": 0.05, "batch_size": 128}],
        description="How the original was trained; `retrain` (the last escalation) uses it.")


class ArchitectureSpec(BaseModel):
    name: str = Field(examples=["cnn-small"],
                      description="A built-in architecture, or `module:factory`.")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   examples=[{"in_channels": 1, "num_classes": 10}])


class ModelCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, examples=["fashion-classifier"])
    architecture: ArchitectureSpec
    dataset: str = Field(examples=["fashion-mnist"])
    policy: Policy = Field(default_factory=Policy)


class ModelPolicyUpdate(BaseModel):
    policy: Policy


class ModelRead(BaseModel):
    name: str
    architecture: ArchitectureSpec
    dataset: str
    policy: Policy
    aliases: dict[str, int] = Field(description="Alias -> version number.")
    created_at: datetime


class VersionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    parent: int | None = None
    status: VersionStatus
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    verification_report: dict[str, Any] | None
    job_id: str | None
    created_at: datetime
    published_at: datetime | None
    superseded_at: datetime | None
    purged_at: datetime | None


class AliasUpdate(BaseModel):
    version: VersionNumber = Field(examples=[3])


class AliasRead(BaseModel):
    model: str
    alias: str
    version: int
