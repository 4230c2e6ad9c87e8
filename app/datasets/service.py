"""Datasets and their samples: registration, streamed manifest ingestion, lookups."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from typing import IO, Any

from pydantic import ValidationError
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import utcnow
from app.core.errors import Conflict, NotFound, Unprocessable, UnsupportedMediaType
from app.core.security import subject_hash
from app.datasets.models import Dataset, DatasetCreate, ManifestRow, Sample, SplitCounts

MANIFEST_COLUMNS = ("sample_key", "subject_ref", "label", "split", "locator")
CSV_TYPES = {"text/csv", "application/csv"}
JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
               "application/json-lines"}
INSERT_BATCH = 5000


# A manifest row is a few hundred characters (every column is bounded); a longer "line" is
# no row, and reading it whole would hold up to the upload limit in memory.
MAX_LINE_CHARS = 64 * 1024


def check_relative_path(path: str, *, what: str = "locator") -> None:
    """Store names and locators are relative paths that stay inside their folder, written as
    the engine's store reads them (unlearning/data/store.py), so that nothing accepted here
    is refused when a job loads it: no absolute or home paths, backslashes, drive letters,
    NUL, or empty, '.' and '..' segments."""
    if (not path or path.startswith(("/", "~")) or ":" in path or "\\" in path
            or "\x00" in path or any(part in ("", ".", "..") for part in path.split("/"))):
        raise ValueError(f"{what} {path!r} must be a relative path inside the store")


def check_locator(locator: str) -> None:
    """A file in the dataset's store, or a row of a safetensors shard (`shard#<row>`)."""
    path, has_row, row = locator.partition("#")
    check_relative_path(path)
    if has_row and not (row.isascii() and row.isdigit()):
        raise ValueError(f"locator {locator!r}: the row after '#' must be a non-negative "
                         "integer")
    if not has_row and path.endswith(".safetensors"):
        raise ValueError(f"locator {locator!r}: a shard locator names its row (`#<row>`)")


def create(db_session: Session, *, dataset_in: DatasetCreate, actor: str) -> Dataset:
    if find(db_session, name=dataset_in.name) is not None:
        raise Conflict(f"Dataset {dataset_in.name!r} already exists.")
    store = dataset_in.store or dataset_in.name
    try:
        check_relative_path(store, what="store")
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    dataset = Dataset(name=dataset_in.name, description=dataset_in.description, store=store)
    db_session.add(dataset)
    db_session.flush()
    audit.record(db_session, actor=actor, action="dataset.created", entity_type="dataset",
                 entity_id=dataset.name, details={"store": store})
    db_session.commit()
    return dataset


def find(db_session: Session, *, name: str) -> Dataset | None:
    return db_session.scalar(select(Dataset).where(Dataset.name == name))


def get(db_session: Session, *, name: str) -> Dataset:
    dataset = find(db_session, name=name)
    if dataset is None:
        raise NotFound(f"Dataset {name!r} does not exist.")
    return dataset


def list_all(db_session: Session) -> list[Dataset]:
    return list(db_session.scalars(select(Dataset).order_by(Dataset.name)))


def split_counts(db_session: Session, *, dataset_id: int) -> SplitCounts:
    counts = SplitCounts()
    rows = db_session.execute(
        select(Sample.split, func.count()).where(
            Sample.dataset_id == dataset_id, Sample.forgotten_at.is_(None)
        ).group_by(Sample.split)
    )
    for split, count in rows:
        setattr(counts, split, count)
    counts.forgotten = db_session.scalar(
        select(func.count()).where(Sample.dataset_id == dataset_id,
                                   Sample.forgotten_at.is_not(None))
    ) or 0
    return counts


def _bounded_lines(text: IO[str]) -> Iterator[str]:
    """The stream's lines, a line longer than MAX_LINE_CHARS refused before it is held."""
    number = 0
    while line := text.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise Unprocessable(f"line {number}: longer than {MAX_LINE_CHARS} characters, no "
                                "manifest row.", line=number)
        yield line


def _csv_rows(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    reader = csv.DictReader(_bounded_lines(text))
    missing = {"sample_key", "label", "split", "locator"} - set(reader.fieldnames or ())
    if missing:
        raise Unprocessable(f"CSV header lacks column(s): {', '.join(sorted(missing))}.",
                            expected_columns=list(MANIFEST_COLUMNS))
    for row in reader:
        yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items() if k}


def _jsonl_rows(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = _bounded_lines(io.TextIOWrapper(stream, encoding="utf-8"))
    for line_number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise Unprocessable(f"line {line_number}: invalid JSON ({exc.msg}).",
                                line=line_number) from None
        except RecursionError:  # a line of nothing but brackets: no row nests that deep
            raise Unprocessable(f"line {line_number}: JSON nested too deeply for a manifest "
                                "row.", line=line_number) from None
        if not isinstance(value, dict):
            raise Unprocessable(f"line {line_number}: expected a JSON object.", line=line_number)
        yield line_number, value


def parse_manifest(stream: IO[bytes], *, content_type: str,
                   check: Callable[[int, ManifestRow], None] | None = None
                   ) -> Iterator[ManifestRow]:
    """Yield validated rows one at a time; a bad row is a 422 naming its line. ``check``
    (line, row) raises for a row the store contradicts (``shards.ManifestChecker``)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in CSV_TYPES:
        rows = _csv_rows(stream)
    elif media_type in JSONL_TYPES:
        rows = _jsonl_rows(stream)
    else:
        raise UnsupportedMediaType(
            "Send the manifest as text/csv (with a header) or application/x-ndjson.",
            accepted=sorted(CSV_TYPES | JSONL_TYPES),
        )
    try:
        for line_number, raw in rows:
            try:
                row = ManifestRow.model_validate(raw)
                check_locator(row.locator)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise Unprocessable(f"line {line_number}: {field}: {first['msg']}.",
                                    line=line_number) from None
            except ValueError as exc:
                raise Unprocessable(f"line {line_number}: {exc}.", line=line_number) from None
            if check is not None:
                check(line_number, row)
            yield row
    except UnicodeDecodeError:
        raise Unprocessable("The manifest is not valid UTF-8.") from None
    except csv.Error as exc:
        raise Unprocessable(f"Malformed CSV: {exc}.") from None


def ingest_manifest(
    db_session: Session, *, dataset: Dataset, rows: Iterator[ManifestRow], secret_key: bytes,
    actor: str,
) -> tuple[int, int]:
    """Insert rows in batches, all in one transaction: a manifest lands whole or not at all.

    Only one batch is in memory at a time, so a manifest of millions of rows streams through.
    Returns (rows inserted, rows with a subject)."""
    inserted = with_subject = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal inserted
        if batch:
            db_session.execute(insert(Sample), batch)
            inserted += len(batch)
            batch.clear()

    try:
        for row in rows:
            hashed = None
            if row.subject_ref:
                hashed = subject_hash(secret_key, row.subject_ref)
                with_subject += 1
            batch.append(dict(dataset_id=dataset.id, sample_key=row.sample_key,
                              subject_hash=hashed, label=row.label, split=row.split.value,
                              locator=row.locator))
            if len(batch) >= INSERT_BATCH:
                flush()
        flush()
    except IntegrityError:
        db_session.rollback()
        raise Conflict("A sample_key in this manifest is repeated or already registered in "
                       f"dataset {dataset.name!r}; nothing was stored.") from None
    except BaseException:
        db_session.rollback()
        raise
    audit.record(db_session, actor=actor, action="dataset.samples_added", entity_type="dataset",
                 entity_id=dataset.name, details={"rows": inserted, "with_subject": with_subject})
    db_session.commit()
    return inserted, with_subject


# ---- what a job reads and erases ----------------------------------------------------------


def held_samples(db_session: Session, *, dataset_id: int, split: str) -> list[Sample]:
    """A split's samples that are not forgotten, in a stable order."""
    return list(db_session.scalars(select(Sample).where(
        Sample.dataset_id == dataset_id, Sample.split == split, Sample.forgotten_at.is_(None))
        .order_by(Sample.id)))


def forgotten_unwiped(db_session: Session, *, limit: int = 10_000
                      ) -> list[tuple[Dataset, list[Sample]]]:
    """Tombstoned samples whose bytes are still in a store, grouped by dataset."""
    rows = db_session.scalars(select(Sample).where(
        Sample.forgotten_at.is_not(None), Sample.wiped_at.is_(None))
        .order_by(Sample.dataset_id, Sample.id).limit(limit)).all()
    grouped: dict[int, list[Sample]] = {}
    for sample in rows:
        grouped.setdefault(sample.dataset_id, []).append(sample)
    return [(db_session.get(Dataset, dataset_id), samples)  # type: ignore[misc]
            for dataset_id, samples in grouped.items()]


def mark_wiped(db_session: Session, *, dataset: Dataset, sample_ids: list[int],
               actor: str = "system") -> None:
    db_session.execute(update(Sample).where(Sample.id.in_(sample_ids))
                       .values(wiped_at=utcnow()).execution_options(synchronize_session=False))
    audit.record(db_session, actor=actor, action="dataset.samples_wiped", entity_type="dataset",
                 entity_id=dataset.name, details={"samples": len(sample_ids)})
    db_session.commit()
