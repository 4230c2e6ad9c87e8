"""The training-data registry: datasets and their samples, with tombstones for forgotten ones."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, BigIntId, UTCDateTime, utcnow

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Split(StrEnum):
    train = "train"
    holdout = "holdout"  # never trained on: a job halves it into its unseen and audit slices
    test = "test"


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    # Root of the sample store, relative to the dataset dir; locators resolve under it.
    store: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("dataset_id", "sample_key"),
        Index("ix_samples_dataset_subject", "dataset_id", "subject_hash"),
        Index("ix_samples_dataset_split_label", "dataset_id", "split", "label"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    sample_key: Mapped[str] = mapped_column(String(256))
    # HMAC of the subject reference under the service's secret key; never the raw identifier.
    subject_hash: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    locator: Mapped[str] = mapped_column(String(512))
    forgotten_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    forgotten_by_request: Mapped[str | None] = mapped_column(
        ForeignKey("deletion_requests.id", ondelete="SET NULL")
    )
    # When the sample's bytes were zeroed in a store Lethe manages (after the tombstone).
    wiped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DatasetCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, examples=["fashion-mnist"])
    description: str = Field(default="", max_length=2000)
    store: str | None = Field(
        default=None, max_length=256,
        description="Sample store folder under the dataset dir (default: the dataset's name).",
        examples=["fashion-mnist"],
    )


class SplitCounts(BaseModel):
    train: int = 0
    holdout: int = 0
    test: int = 0
    forgotten: int = 0


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    description: str
    store: str
    created_at: datetime
    samples: SplitCounts = Field(default_factory=SplitCounts)


class ManifestRow(BaseModel):
    """One line of a sample manifest (CSV with a header, or JSON lines)."""

    sample_key: str = Field(min_length=1, max_length=256)
    subject_ref: str | None = Field(default=None, max_length=256)
    label: int = Field(ge=0, le=1_000_000)
    split: Split
    locator: str = Field(min_length=1, max_length=512)


class ManifestResult(BaseModel):
    dataset: str
    inserted: int
    with_subject: int = Field(description="Rows of this manifest that name a subject.")


class ShardRead(BaseModel):
    path: str = Field(description="Inside the dataset's store; locators are `<path>#<row>`.")
    rows: int
    sample_shape: list[int] = Field(description="[C, H, W] of each row.")
    labels: dict[str, int] = Field(description="Rows per label.")
