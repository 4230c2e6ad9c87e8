"""Deletion requests as they are read: one request (with who may see it), filtered pages,
exports, the read models the API shows, and the samples a request covers.

Intake is in intake.py, the transitions in lifecycle.py, the aggregates in metrics.py."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import BadRequest, NotFound
from app.core.fields import in_utc
from app.datasets.models import Sample
from app.models_registry.models import Model, ModelVersion
from app.references import service as references
from app.requests.models import (
    OPEN,
    DeletionRequest,
    DeletionRequestRead,
    DeletionTarget,
    Outcome,
    RequestKind,
    RequestStatus,
    TargetRead,
    TargetStatus,
)
from unlearning.scenarios import Scenario


def coverage(kind: RequestKind, subject: str | None, payload: dict[str, Any]
             ) -> ColumnElement[bool]:
    """The samples a request covers that are still held, as a SQL condition: used to count
    them at intake and to load them when the job runs."""
    held = Sample.forgotten_at.is_(None)
    if kind == RequestKind.subject:
        return and_(held, Sample.subject_hash == subject)
    if kind == RequestKind.class_:
        # A class is forgotten from the training data; its test images stay to measure it.
        return and_(held, Sample.label == payload["class_label"], Sample.split == "train")
    return and_(held, Sample.sample_key.in_(payload["sample_keys"]))


def samples_covered(db_session: Session, *, request: DeletionRequest, dataset_id: int
                    ) -> list[Sample]:
    return list(db_session.scalars(select(Sample).where(
        Sample.dataset_id == dataset_id,
        coverage(RequestKind(request.kind), request.subject_hash, request.payload))
        .order_by(Sample.id)))


def get(db_session: Session, *, request_id: str, principal: Principal) -> DeletionRequest:
    """A requester sees only its own client's requests; anyone else's is simply not found."""
    request = db_session.get(DeletionRequest, request_id)
    if request is None or (principal.role == Role.requester
                           and request.client_id != principal.client_id):
        raise NotFound(f"Deletion request {request_id!r} does not exist.")
    return request


@dataclass
class RequestFilters:
    status: list[RequestStatus] | None = None
    kind: RequestKind | None = None
    model: str | None = None
    client_id: str | None = None
    overdue: bool | None = None
    received_after: datetime | None = None
    received_before: datetime | None = None


SORT_COLUMNS = {"received_at": DeletionRequest.received_at, "due_at": DeletionRequest.due_at}


def _filtered(principal: Principal, filters: RequestFilters, now: datetime
              ) -> Select[DeletionRequest]:
    query = select(DeletionRequest)
    client_id = principal.client_id if principal.role == Role.requester else filters.client_id
    if client_id is not None:
        query = query.where(DeletionRequest.client_id == client_id)
    if filters.status:
        query = query.where(DeletionRequest.status.in_([s.value for s in filters.status]))
    if filters.kind:
        query = query.where(DeletionRequest.kind == filters.kind.value)
    if filters.model:
        query = query.where(DeletionRequest.id.in_(
            select(DeletionTarget.request_id).join(Model, Model.id == DeletionTarget.model_id)
            .where(Model.name == filters.model)))
    if filters.received_after:
        query = query.where(DeletionRequest.received_at >= filters.received_after)
    if filters.received_before:
        query = query.where(DeletionRequest.received_at < filters.received_before)
    if filters.overdue is not None:
        is_overdue = and_(DeletionRequest.due_at < now,
                          DeletionRequest.status.in_([s.value for s in OPEN]))
        query = query.where(is_overdue if filters.overdue else ~is_overdue)
    return query


def encode_cursor(sort_value: datetime, request_id: str) -> str:
    raw = json.dumps([sort_value.isoformat(), request_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor as ``encode_cursor`` made it; anything else (a time without a zone included:
    it was never one of ours) is a 400."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, request_id = json.loads(raw)
        sort_value = datetime.fromisoformat(value)
        if sort_value.tzinfo is None or not isinstance(request_id, str):
            raise ValueError("not a cursor this service made")
        return in_utc(sort_value), request_id
    except (ValueError, TypeError) as exc:
        raise BadRequest("Malformed cursor.") from exc


def list_page(
    db_session: Session, *, principal: Principal, filters: RequestFilters,
    sort: str = "received_at", descending: bool = True, limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[DeletionRequest], str | None]:
    """Keyset pagination over (sort column, id): stable while new requests arrive."""
    column = SORT_COLUMNS[sort]
    query = _filtered(principal, filters, utcnow())
    if cursor:
        value, last_id = decode_cursor(cursor)
        if descending:
            query = query.where(or_(column < value, and_(column == value,
                                                         DeletionRequest.id < last_id)))
        else:
            query = query.where(or_(column > value, and_(column == value,
                                                         DeletionRequest.id > last_id)))
    order = (column.desc(), DeletionRequest.id.desc()) if descending else (column,
                                                                           DeletionRequest.id)
    rows = list(db_session.scalars(query.order_by(*order).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor(getattr(page[-1], sort), page[-1].id) if more else None
    return page, next_cursor


def iter_all(db_session: Session, *, principal: Principal, filters: RequestFilters,
             sort: str = "received_at", descending: bool = True, chunk: int = 500
             ) -> Iterable[list[DeletionRequest]]:
    """Every matching request, a page at a time (for exports)."""
    cursor: str | None = None
    while True:
        page, cursor = list_page(db_session, principal=principal, filters=filters, sort=sort,
                                 descending=descending, limit=chunk, cursor=cursor)
        if page:
            yield page
        if cursor is None:
            return


def days_left(request: DeletionRequest, now: datetime) -> int | None:
    if RequestStatus(request.status) not in OPEN:
        return None
    return math.ceil((request.due_at - now) / timedelta(days=1))


def to_read(db_session: Session, requests: Sequence[DeletionRequest]
            ) -> list[DeletionRequestRead]:
    """Read models for a page of requests, with their targets in one query."""
    ids = [r.id for r in requests]
    rows: list[tuple[DeletionTarget, str, int | None]] = [
        (target, name, number) for target, name, number in db_session.execute(
            select(DeletionTarget, Model.name, ModelVersion.number)
            .join(Model, Model.id == DeletionTarget.model_id)
            .outerjoin(ModelVersion, ModelVersion.id == DeletionTarget.version_id)
            .where(DeletionTarget.request_id.in_(ids)).order_by(DeletionTarget.id))
    ] if ids else []
    targets: dict[str, list[TargetRead]] = {}
    waiting = references.models_waiting(
        db_session, {t.model_id for t, _, _ in rows if t.status == TargetStatus.queued.value
                     and t.job_id is None})
    for target, model_name, version_number in rows:
        targets.setdefault(target.request_id, []).append(TargetRead(
            model=model_name, status=TargetStatus(target.status),
            scenario=Scenario.from_dict(target.scenario).label(),
            sample_count=target.sample_count, job_id=target.job_id, version=version_number,
            failure_reason=target.failure_reason,
            waiting_for=references.WAITING_REASON if target.model_id in waiting
            and target.status == TargetStatus.queued.value and target.job_id is None else None))
    now = utcnow()
    return [read_model(r, targets.get(r.id, []), now) for r in requests]


def read_model(r: DeletionRequest, targets: list[TargetRead], now: datetime
                ) -> DeletionRequestRead:
    left = days_left(r, now)
    return DeletionRequestRead(
        id=r.id, client_id=r.client_id, kind=RequestKind(r.kind),
        status=RequestStatus(r.status), outcome=Outcome(r.outcome) if r.outcome else None,
        reason=r.reason, model=r.model_scope, payload=r.payload, targets=targets,
        received_at=r.received_at, due_at=r.due_at, days_left=left,
        overdue=left is not None and r.due_at < now, queued_at=r.queued_at,
        processing_at=r.processing_at, verifying_at=r.verifying_at,
        completed_at=r.completed_at, failed_at=r.failed_at, canceled_at=r.canceled_at,
        rejected_at=r.rejected_at, updated_at=r.updated_at)
