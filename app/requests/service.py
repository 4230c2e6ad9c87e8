"""Deletion requests: intake, target resolution, queries. The transitions a request and its
targets may make are in lifecycle.py."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Problem,
    Unprocessable,
    UnstorableValue,
)
from app.core.fields import in_utc
from app.core.security import subject_hash
from app.datasets.models import Sample
from app.models_registry.models import Model, ModelVersion, Policy
from app.observability.request_id import get_request_id
from app.references import service as references
from app.requests import lifecycle
from app.requests.models import (
    OPEN,
    BackdoorRequest,
    ClassRequest,
    DeletionRequest,
    DeletionRequestRead,
    DeletionTarget,
    Outcome,
    RequestKind,
    RequestStatus,
    SamplesRequest,
    SubjectRequest,
    TargetRead,
    TargetStatus,
)
from app.webhooks import service as webhooks

DEFAULT_DUE_DAYS = 30
SCENARIO_OF_KIND = {RequestKind.subject: "subset", RequestKind.samples: "subset",
                    RequestKind.class_: "class", RequestKind.backdoor: "backdoor"}
# Kinds that act on a model as a whole, and the roles that may always send them.
SCENARIO_KINDS = {RequestKind.class_, RequestKind.backdoor}
SCENARIO_ROLES = {Role.operator, Role.admin}
AnyCreate = SubjectRequest | SamplesRequest | ClassRequest | BackdoorRequest


@dataclass(frozen=True)
class ModelInScope:
    name: str
    policy: Policy


@dataclass
class Resolution:
    """Which models a request applies to, and how many samples of each it covers."""

    counts: dict[int, int] = field(default_factory=dict)  # model id -> samples
    models: dict[int, ModelInScope] = field(default_factory=dict)  # the same model ids
    details: dict[str, Any] = field(default_factory=dict)
    subscribed: bool = True  # whether the client has active webhooks (True when unknown)


# ---- intake ---------------------------------------------------------------------------


def fingerprint(body: AnyCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def _authorize_kind(principal: Principal, kind: RequestKind, model: ModelInScope) -> None:
    """Forgetting a whole class or a backdoor changes what a model does for everyone, not
    only for one data subject: such requests need an operator (or admin) key, or a policy
    whose ``scenario_clients`` names the requester's client."""
    if (kind not in SCENARIO_KINDS or principal.role in SCENARIO_ROLES
            or principal.client_id in model.policy.scenario_clients):
        return
    raise Forbidden(
        f"A {kind.value} request needs an operator key, or a policy on model {model.name!r} "
        f"that names client {principal.client_id!r} in `scenario_clients`.",
        model=model.name, rule="scenario_clients")


def _resolve(db_session: Session, body: AnyCreate, subject: str | None, principal: Principal
             ) -> Resolution:
    """The models in scope with their policies, the samples each holds that the request
    covers and whether the client has webhooks to notify, in one query: intake is the hot
    path, and every query is a round trip. Refuses a kind the principal may not send for a
    model it names or would reach."""
    kind, payload, client_id = RequestKind(body.kind), _payload(body), principal.client_id
    held = (select(func.count()).where(Sample.dataset_id == Model.dataset_id,
                                       coverage(kind, subject, payload))
            .correlate(Model).scalar_subquery())
    query = select(Model.id, Model.name, Model.dataset_id, Model.policy, held,
                   webhooks.active_subscriptions(client_id))
    if body.model is not None:
        query = query.where(Model.name == body.model)
    rows = db_session.execute(query).all()
    if body.model is not None and not rows:
        raise Unprocessable(f"Model {body.model!r} does not exist.")
    resolution = Resolution(subscribed=not rows or rows[0][5] > 0)
    for model_id, name, _, policy, count, _ in rows:
        if not count and body.model is None:
            continue  # neither named nor holding anything the request covers
        in_scope = ModelInScope(name, Policy.model_validate(policy))
        _authorize_kind(principal, kind, in_scope)
        if count:
            resolution.counts[model_id] = count
            resolution.models[model_id] = in_scope
    if isinstance(body, SamplesRequest | BackdoorRequest) and rows:
        datasets = {row.dataset_id for row in rows}
        found = set(db_session.scalars(select(Sample.sample_key).where(
            Sample.dataset_id.in_(datasets), coverage(kind, subject, payload))))
        missing = set(body.sample_keys) - found
        if missing:
            resolution.details["missing_sample_keys"] = sorted(missing)[:100]
            resolution.details["missing_count"] = len(missing)
    return resolution


def _resolve_many(db_session: Session,
                  items: Sequence[tuple[AnyCreate, str | None, Principal]]
                  ) -> list[Resolution | Problem]:
    """``_resolve`` for a batch of (body, subject hash, who) in a fixed number of queries:
    the models, the held samples of every subject in the batch per model, and which clients
    have webhooks. Subject requests are nearly all of intake; the other kinds (a sample list,
    a class, a backdoor) resolve one by one."""
    subjects = {subject for body, subject, _ in items if isinstance(body, SubjectRequest)}
    if not subjects:
        return [_resolve_or_problem(db_session, body, subject, principal)
                for body, subject, principal in items]
    models = {row.id: row for row in db_session.execute(
        select(Model.id, Model.name, Model.dataset_id, Model.policy))}
    # Per dataset, not joined to the models: both lists are literal, so the lookup is the
    # (dataset_id, subject_hash) index's, whatever the planner's statistics say.
    per_dataset: dict[tuple[int, str], int] = {
        (dataset_id, str(subject)): count for dataset_id, subject, count in db_session.execute(
            select(Sample.dataset_id, Sample.subject_hash, func.count())
            .where(Sample.dataset_id.in_({row.dataset_id for row in models.values()}),
                   Sample.subject_hash.in_(subjects), Sample.forgotten_at.is_(None))
            .group_by(Sample.dataset_id, Sample.subject_hash))} if models else {}
    held: dict[str, dict[int, int]] = {}
    for (dataset_id, subject), count in per_dataset.items():
        for model in models.values():
            if model.dataset_id == dataset_id:
                held.setdefault(subject, {})[model.id] = count
    subscribed = webhooks.subscribed_clients(db_session, {p.client_id for _, _, p in items})
    names = {row.name for row in models.values()}
    policies: dict[int, Policy] = {}  # validated once per batch, for the models in scope
    resolutions: list[Resolution | Problem] = []
    for body, subject, principal in items:
        if not isinstance(body, SubjectRequest) or (body.model is not None
                                                    and body.model not in names):
            # An unknown model is answered as alone: it may also be a name the database
            # cannot even store.
            resolutions.append(_resolve_or_problem(db_session, body, subject, principal))
            continue
        resolution = Resolution(subscribed=principal.client_id in subscribed)
        for model_id, count in held.get(subject or "", {}).items():
            model = models[model_id]
            if body.model is None or model.name == body.model:
                resolution.counts[model_id] = count
                if model_id not in policies:
                    policies[model_id] = Policy.model_validate(model.policy)
                resolution.models[model_id] = ModelInScope(model.name, policies[model_id])
        resolutions.append(resolution)
    return resolutions


def _resolve_or_problem(db_session: Session, body: AnyCreate, subject: str | None,
                        principal: Principal) -> Resolution | Problem:
    try:
        return _resolve(db_session, body, subject, principal)
    except Problem as problem:
        return problem


def samples_covered(db_session: Session, *, request: DeletionRequest, dataset_id: int
                    ) -> list[Sample]:
    return list(db_session.scalars(select(Sample).where(
        Sample.dataset_id == dataset_id,
        coverage(RequestKind(request.kind), request.subject_hash, request.payload))
        .order_by(Sample.id)))


def _payload(body: AnyCreate) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude={"kind", "model", "subject_ref"})


@dataclass(frozen=True)
class Submission:
    """One request to record: who asks, what, under which Idempotency-Key, and the trace of
    the HTTP request that carried it."""

    principal: Principal
    body: AnyCreate
    idempotency_key: str | None = None
    trace_id: str | None = None


# A recorded request as the API shows it, and whether it replays an earlier one.
Submitted = tuple[DeletionRequestRead, bool]


def create(
    db_session: Session, *, principal: Principal, body: AnyCreate,
    idempotency_key: str | None, secret_key: bytes,
) -> tuple[DeletionRequest, bool]:
    """Record a request and route it: queued, awaiting approval, or closed as ``no_data``.

    Returns the request and whether it is a replay of an earlier one with the same
    Idempotency-Key and body."""
    request, _, replayed = _create(
        db_session, Submission(principal, body, idempotency_key, get_request_id()), secret_key)
    return request, replayed


def _submit_one(db_session: Session, submission: Submission, secret_key: bytes) -> Submitted:
    request, targets, replayed = _create(db_session, submission, secret_key)
    if targets is None:
        return to_read(db_session, [request])[0], replayed
    return _read_model(request, targets, utcnow()), replayed


def submit_many(db_session: Session, submissions: Sequence[Submission], *, secret_key: bytes
                ) -> list[Submitted | Problem]:
    """Record many requests in one transaction: group commit. Each answer is what recording
    that submission alone would have given (the request as the API shows it, or the problem
    it raised); what costs a round trip (the key lookups, the resolution, the
    inserts, the audit append, the commit) is paid once for the batch.

    Idempotency: a key already recorded replays its request; within the batch, the first
    use of a key is recorded and later uses replay it. Should the commit still fail (a key
    committed meanwhile by another process, a value the database cannot store), the batch is
    rolled back and each submission recorded on its own, so one cannot fail another."""
    try:
        return _submit_together(db_session, submissions, secret_key)
    except (IntegrityError, DataError):
        db_session.rollback()
        return [_submit_or_problem(db_session, s, secret_key) for s in submissions]


def _submit_together(db_session: Session, submissions: Sequence[Submission], secret_key: bytes
                     ) -> list[Submitted | Problem]:
    results: list[Submitted | Problem | None] = [None] * len(submissions)
    prints = [fingerprint(s.body) for s in submissions]
    keys = [(s.principal.client_id, s.idempotency_key) if s.idempotency_key is not None
            else None for s in submissions]
    recorded = _by_idempotency_keys(db_session, {key for key in keys if key is not None})
    replays: dict[int, DeletionRequest] = {}
    first_use: dict[tuple[str, str], int] = {}
    fresh: list[int] = []
    repeats: list[tuple[int, int]] = []  # (a later use of a key, its first use in the batch)
    for i, key in enumerate(keys):
        if key is not None and key in recorded:
            try:
                replays[i] = _replay(recorded[key], prints[i])
            except Conflict as conflict:
                results[i] = conflict
        elif key is not None and key in first_use:
            repeats.append((i, first_use[key]))
        else:
            if key is not None:
                first_use[key] = i
            fresh.append(i)
    if replays:
        for i, read in zip(replays, to_read(db_session, list(replays.values())), strict=True):
            results[i] = (read, True)

    subjects = {i: _subject(submissions[i].body, secret_key) for i in fresh}
    resolutions = _resolve_many(db_session, [
        (submissions[i].body, subjects[i], submissions[i].principal) for i in fresh])
    now = utcnow()
    written: dict[int, tuple[DeletionRequest, list[TargetRead]]] = {}
    for i, resolution in zip(fresh, resolutions, strict=True):
        if isinstance(resolution, Problem):
            results[i] = resolution
        else:
            written[i] = _intake(db_session, submissions[i], prints[i], subjects[i],
                                 resolution, now)
    db_session.commit()
    for i, (request, targets) in written.items():
        results[i] = (_read_model(request, targets, now), False)
    for i, first in repeats:
        earlier = results[first]
        if isinstance(earlier, tuple) and prints[i] == prints[first]:
            results[i] = (earlier[0], True)
        elif isinstance(earlier, tuple):
            results[i] = Conflict("This Idempotency-Key was already used with a different "
                                  "body.", request_id=earlier[0].id)
        else:  # the first use failed: this one is judged on its own
            results[i] = _submit_or_problem(db_session, submissions[i], secret_key)
    return _complete(results)


def _submit_or_problem(db_session: Session, submission: Submission, secret_key: bytes
                       ) -> Submitted | Problem:
    try:
        return _submit_one(db_session, submission, secret_key)
    except Problem as problem:
        db_session.rollback()
        return problem


def _complete(results: list[Submitted | Problem | None]) -> list[Submitted | Problem]:
    assert all(result is not None for result in results), "a submission was left unanswered"
    return [result for result in results if result is not None]


def _create(db_session: Session, submission: Submission, secret_key: bytes
            ) -> tuple[DeletionRequest, list[TargetRead] | None, bool]:
    principal, idempotency_key = submission.principal, submission.idempotency_key
    body_fingerprint = fingerprint(submission.body)
    try:
        subject = _subject(submission.body, secret_key)
        resolution = _resolve(db_session, submission.body, subject, principal)
        request, targets = _intake(db_session, submission, body_fingerprint, subject,
                                   resolution, utcnow())
        db_session.commit()
    except (IntegrityError, Unprocessable):
        # The key is looked up only when intake fails, not before every request: the unique
        # constraint fired because another request with this key is committed (now or in a
        # race), or its body no longer resolves (its model is gone). Answer with that request.
        db_session.rollback()
        existing = (_by_idempotency_key(db_session, principal.client_id, idempotency_key)
                    if idempotency_key is not None else None)
        if existing is None:
            raise
        return _replay(existing, body_fingerprint), None, True
    except DataError as exc:  # a value PostgreSQL cannot store: this item's problem alone
        db_session.rollback()
        raise UnstorableValue.from_error(exc) from None
    return request, targets, False


def _by_idempotency_key(db_session: Session, client_id: str, key: str
                        ) -> DeletionRequest | None:
    return db_session.scalar(select(DeletionRequest).where(
        DeletionRequest.client_id == client_id, DeletionRequest.idempotency_key == key))


def _by_idempotency_keys(db_session: Session, keys: set[tuple[str, str]]
                         ) -> dict[tuple[str, str], DeletionRequest]:
    if not keys:
        return {}
    # Two lists rather than a list of pairs: the unique (client_id, idempotency_key) index
    # serves it; the few extra pairs it may return are dropped here.
    found = db_session.scalars(select(DeletionRequest).where(
        DeletionRequest.client_id.in_({client for client, _ in keys}),
        DeletionRequest.idempotency_key.in_({key for _, key in keys})))
    return {pair: r for r in found
            if (pair := (r.client_id, r.idempotency_key or "")) in keys}


def _replay(existing: DeletionRequest, body_fingerprint: str) -> DeletionRequest:
    if existing.fingerprint != body_fingerprint:
        raise Conflict("This Idempotency-Key was already used with a different body.",
                       request_id=existing.id)
    return existing


def _subject(body: AnyCreate, secret_key: bytes) -> str | None:
    return subject_hash(secret_key, body.subject_ref) if isinstance(body, SubjectRequest) else None


def _intake(db_session: Session, submission: Submission, body_fingerprint: str,
            subject: str | None, resolution: Resolution, now: datetime
            ) -> tuple[DeletionRequest, list[TargetRead]]:
    """The request, its targets and its first transition, written in one flush at commit
    (the unique idempotency key is checked there). Returns the request and its targets as
    the API shows them."""
    principal, body = submission.principal, submission.body
    due_days = min((m.policy.due_days for m in resolution.models.values()),
                   default=DEFAULT_DUE_DAYS)
    request = DeletionRequest(
        id=str(uuid.uuid4()), client_id=principal.client_id, api_key_id=principal.key_id,
        kind=body.kind, subject_hash=subject, payload={**_payload(body), **resolution.details},
        model_scope=body.model, idempotency_key=submission.idempotency_key,
        fingerprint=body_fingerprint, trace_id=submission.trace_id,
        status=RequestStatus.received.value, received_at=now, updated_at=now,
        due_at=now + timedelta(days=due_days),
    )
    db_session.add(request)
    lifecycle.audit_event(db_session, request, principal.actor, "received",
                          {"kind": body.kind})
    if not resolution.counts:
        request.outcome = Outcome.no_data.value
        request.reason = "No model holds data this request covers."
        lifecycle.transition(db_session, request, RequestStatus.rejected, principal.actor,
                             now=now, subscribed=resolution.subscribed)
        return request, []
    scenario = SCENARIO_OF_KIND[RequestKind(body.kind)]
    if isinstance(body, ClassRequest):  # one class per job: the engine forgets one at a time
        scenario = f"class:{body.class_label}"
    targets = []
    for model_id, count in resolution.counts.items():
        needs_approval = resolution.models[model_id].policy.require_approval
        status = TargetStatus.awaiting_approval if needs_approval else TargetStatus.queued
        targets.append(DeletionTarget(
            request_id=request.id, model_id=model_id, status=status.value, scenario=scenario,
            sample_count=count, queued_at=None if needs_approval else now, updated_at=now))
    db_session.add_all(targets)  # flushed in this order, the order to_read lists them in
    # What sync_status would read back from the targets just written.
    request_status, outcome = lifecycle.derive_status(t.status for t in targets)
    request.outcome = outcome.value if outcome else None
    lifecycle.transition(db_session, request, request_status, principal.actor, now=now,
                         subscribed=resolution.subscribed)
    return request, [TargetRead(model=resolution.models[t.model_id].name,
                                status=TargetStatus(t.status), scenario=t.scenario,
                                sample_count=t.sample_count, job_id=None, version=None,
                                failure_reason=None) for t in targets]


def get(db_session: Session, *, request_id: str, principal: Principal) -> DeletionRequest:
    """A requester sees only its own client's requests; anyone else's is simply not found."""
    request = db_session.get(DeletionRequest, request_id)
    if request is None or (principal.role == Role.requester
                           and request.client_id != principal.client_id):
        raise NotFound(f"Deletion request {request_id!r} does not exist.")
    return request


# ---- reads ----------------------------------------------------------------------------------


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
              ) -> Select[tuple[DeletionRequest]]:
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
    rows = db_session.execute(
        select(DeletionTarget, Model.name, ModelVersion.number)
        .join(Model, Model.id == DeletionTarget.model_id)
        .outerjoin(ModelVersion, ModelVersion.id == DeletionTarget.version_id)
        .where(DeletionTarget.request_id.in_(ids)).order_by(DeletionTarget.id)) if ids else []
    targets: dict[str, list[TargetRead]] = {}
    rows = list(rows)
    waiting = references.models_waiting(
        db_session, {t.model_id for t, _, _ in rows if t.status == TargetStatus.queued.value
                     and t.job_id is None})
    for target, model_name, version_number in rows:
        targets.setdefault(target.request_id, []).append(TargetRead(
            model=model_name, status=TargetStatus(target.status), scenario=target.scenario,
            sample_count=target.sample_count, job_id=target.job_id, version=version_number,
            failure_reason=target.failure_reason,
            waiting_for=references.WAITING_REASON if target.model_id in waiting
            and target.status == TargetStatus.queued.value and target.job_id is None else None))
    now = utcnow()
    return [_read_model(r, targets.get(r.id, []), now) for r in requests]


def _read_model(r: DeletionRequest, targets: list[TargetRead], now: datetime
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


# ---- aggregates (the dashboard's overview, the metrics endpoint) ---------------------------


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
