"""Intake: recording deletion requests. ``POST /v1/deletion-requests`` goes through a group
commit (app/core/group_commit.py): the requests that arrive together are authenticated,
checked and recorded in one transaction; ``:bulk`` records its items the same way.

Intake is the service's hot path, and a request's own work is small next to what each
transaction costs: a connection checkout, a round trip per query, the audit chain's lock, the
COMMIT. A batch pays those once. Every request still gets exactly the answer it would have
had alone (its request, its replay, or its own problem), and only after the commit that
recorded it. One request alone takes the same path as a batch of one."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.auth import service as auth
from app.auth.models import Role
from app.auth.service import Principal
from app.core.db import utcnow
from app.core.errors import Conflict, Forbidden, Problem, Unprocessable, UnstorableValue
from app.core.group_commit import GroupCommit
from app.core.security import subject_hash
from app.datasets.models import Sample
from app.models_registry.models import Model, Policy
from app.requests import lifecycle, service
from app.requests.models import (
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
from unlearning.scenarios import Scenario, Trigger

MAX_BATCH = 64

DEFAULT_DUE_DAYS = 30
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

    subscribed: bool  # whether the client has active webhooks
    counts: dict[int, int] = field(default_factory=dict)  # model id -> samples
    models: dict[int, ModelInScope] = field(default_factory=dict)  # the same model ids
    details: dict[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True)
class Presented:
    """A request as it arrived: the API key presented (not yet checked) and the body."""

    key: str
    body: AnyCreate
    idempotency_key: str | None
    trace_id: str | None


def record_batch(factory: sessionmaker[Session], secret_key: bytes,
                 items: list[Presented]) -> list[Submitted | Problem]:
    """Authenticate every item's key and check it may submit, then record the rest together.
    An item refused (401, 403) or failing on its own (409, 422) does not affect the others."""
    answers: list[Submitted | Problem | None] = [None] * len(items)
    with factory() as db_session:
        principals = auth.authenticate_many(db_session, [item.key for item in items])
        admitted: list[int] = []
        submissions: list[Submission] = []
        for i, (item, principal) in enumerate(zip(items, principals, strict=True)):
            try:
                if isinstance(principal, Problem):
                    raise principal
                auth.authorize(principal, auth.SUBMITTERS)
            except Problem as problem:
                answers[i] = problem
                continue
            admitted.append(i)
            submissions.append(Submission(principal, item.body, item.idempotency_key,
                                          item.trace_id))
        if submissions:
            for i, answer in zip(admitted, submit_many(
                    db_session, submissions, secret_key=secret_key), strict=True):
                answers[i] = answer
        db_session.commit()  # the keys' last-used times, where nothing else committed them
    return [answer for answer in answers if answer is not None]


def group_committer(factory: sessionmaker[Session], secret_key: bytes
                    ) -> GroupCommit[Presented, Submitted]:
    return GroupCommit(partial(record_batch, factory, secret_key), max_batch=MAX_BATCH)


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
        for i, read in zip(replays, service.to_read(db_session, list(replays.values())),
                           strict=True):
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
        results[i] = (service.read_model(request, targets, now), False)
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


def _submit_one(db_session: Session, submission: Submission, secret_key: bytes) -> Submitted:
    principal, idempotency_key = submission.principal, submission.idempotency_key
    body_fingerprint = fingerprint(submission.body)
    try:
        subject = _subject(submission.body, secret_key)
        (resolution,) = _resolve_many(db_session, [(submission.body, subject, principal)])
        if isinstance(resolution, Problem):
            raise resolution
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
        return service.to_read(db_session, [_replay(existing, body_fingerprint)])[0], True
    except DataError as exc:  # a value PostgreSQL cannot store: this item's problem alone
        db_session.rollback()
        raise UnstorableValue.from_error(exc) from None
    return service.read_model(request, targets, utcnow()), False


# ---- resolution: which models a request applies to -----------------------------------------

Resolvable = tuple[AnyCreate, str | None, Principal]  # body, subject hash, who sends it


def _resolve_many(db_session: Session, items: Sequence[Resolvable]
                  ) -> list[Resolution | Problem]:
    """For each (body, subject hash, who): the models in scope with their policies, the
    samples each holds that the request covers, and whether the client has webhooks to
    notify; or the item's problem (a model that does not exist, a kind its sender may not
    send for a model it names or would reach).

    One request or a batch, the same path: intake is the hot path, and every query is a round
    trip. Subject requests, nearly all of intake, take a fixed number of queries whatever
    their number: the models, the held samples of every subject in the batch per dataset,
    which clients have webhooks. A sample list, a class or a backdoor adds one of its own."""
    models = {row.id: row for row in db_session.execute(
        select(Model.id, Model.name, Model.dataset_id, Model.policy).order_by(Model.id))}
    by_name = {row.name: model_id for model_id, row in models.items()}
    unknown = {body.model for body, _, _ in items if body.model is not None} - set(by_name)
    if unknown:
        # Put to the database all the same, like every value a request carries: a name it
        # cannot even store (PostgreSQL keeps no NUL) is then that item's `unstorable-value`
        # (DataError: the batch is retried item by item), as for any other field.
        db_session.execute(select(Model.id).where(Model.name.in_(unknown))).all()
    subjects = {subject for body, subject, _ in items
                if isinstance(body, SubjectRequest) and subject is not None}
    held_by_subject = _held_by_subject(
        db_session, {row.dataset_id for row in models.values()}, subjects)
    subscribed = webhooks.subscribed_clients(db_session, {p.client_id for _, _, p in items})
    policies: dict[int, Policy] = {}  # validated once per batch, for the models in scope

    def in_scope(model_id: int) -> ModelInScope:
        if model_id not in policies:
            policies[model_id] = Policy.model_validate(models[model_id].policy)
        return ModelInScope(models[model_id].name, policies[model_id])

    resolutions: list[Resolution | Problem] = []
    for body, subject, principal in items:
        if body.model is not None and body.model not in by_name:
            resolutions.append(Unprocessable(f"Model {body.model!r} does not exist."))
            continue
        scope = [by_name[body.model]] if body.model is not None else list(models)
        datasets = {models[model_id].dataset_id for model_id in scope}
        resolution = Resolution(subscribed=principal.client_id in subscribed)
        if isinstance(body, SubjectRequest):
            held = held_by_subject.get(subject or "", {})
        else:
            held, found = _held(db_session, body, datasets)
            missing = (set(body.sample_keys) - found
                       if isinstance(body, SamplesRequest | BackdoorRequest) else set())
            if missing:
                resolution.details["missing_sample_keys"] = sorted(missing)[:100]
                resolution.details["missing_count"] = len(missing)
        try:
            for model_id in scope:
                count = held.get(models[model_id].dataset_id, 0)
                if not count and body.model is None:
                    continue  # neither named nor holding anything the request covers
                model = in_scope(model_id)
                _authorize_kind(principal, RequestKind(body.kind), model)
                if count:
                    resolution.counts[model_id] = count
                    resolution.models[model_id] = model
        except Forbidden as refused:
            resolutions.append(refused)
            continue
        resolutions.append(resolution)
    return resolutions


def _held_by_subject(db_session: Session, datasets: set[int], subjects: set[str]
                     ) -> dict[str, dict[int, int]]:
    """Subject hash -> dataset -> the samples of that subject the dataset still holds."""
    if not datasets or not subjects:
        return {}
    # Per dataset, not joined to the models: both lists are literal, so the lookup is the
    # (dataset_id, subject_hash) index's, whatever the planner's statistics say.
    rows = db_session.execute(
        select(Sample.dataset_id, Sample.subject_hash, func.count())
        .where(Sample.dataset_id.in_(datasets), Sample.subject_hash.in_(subjects),
               Sample.forgotten_at.is_(None))
        .group_by(Sample.dataset_id, Sample.subject_hash))
    held: dict[str, dict[int, int]] = {}
    for dataset_id, subject, count in rows:
        held.setdefault(str(subject), {})[dataset_id] = count
    return held


def _held(db_session: Session, body: SamplesRequest | ClassRequest | BackdoorRequest,
          datasets: set[int]) -> tuple[dict[int, int], set[str]]:
    """Dataset -> the samples the request covers that it still holds; and for a sample list
    or a backdoor, which of the keys it names were found."""
    if not datasets:
        return {}, set()
    covered = (Sample.dataset_id.in_(datasets),
               service.coverage(RequestKind(body.kind), None, _payload(body)))
    if isinstance(body, ClassRequest):
        return {dataset_id: count for dataset_id, count in db_session.execute(
            select(Sample.dataset_id, func.count()).where(*covered)
            .group_by(Sample.dataset_id))}, set()
    counts: Counter[int] = Counter()
    found: set[str] = set()
    for dataset_id, key in db_session.execute(
            select(Sample.dataset_id, Sample.sample_key).where(*covered)):
        counts[dataset_id] += 1
        found.add(key)
    return dict(counts), found


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


# ---- recording ------------------------------------------------------------------------------


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
    targets = []
    for model_id, count in resolution.counts.items():
        needs_approval = resolution.models[model_id].policy.require_approval
        status = TargetStatus.awaiting_approval if needs_approval else TargetStatus.queued
        targets.append(DeletionTarget(
            request_id=request.id, model_id=model_id, status=status.value,
            scenario=scenario_of(db_session, body, model_id).to_dict(),
            sample_count=count, queued_at=None if needs_approval else now, updated_at=now))
    db_session.add_all(targets)  # flushed in this order, the order to_read lists them in
    # What sync_status would read back from the targets just written.
    request_status, outcome = lifecycle.derive_status(t.status for t in targets)
    request.outcome = outcome.value if outcome else None
    lifecycle.transition(db_session, request, request_status, principal.actor, now=now,
                         subscribed=resolution.subscribed)
    return request, [TargetRead(model=resolution.models[t.model_id].name,
                                status=TargetStatus(t.status),
                                scenario=Scenario.from_dict(t.scenario).label(),
                                sample_count=t.sample_count, job_id=None, version=None,
                                failure_reason=None) for t in targets]


def scenario_of(db_session: Session, body: AnyCreate, model_id: int) -> Scenario:
    """What a request asks the engine to forget on one model, stored with its target as the
    engine's JSON: targets with equal scenarios may share a job. A class is its own scenario
    (the engine forgets one class at a time); a backdoor carries its own request's trigger (a
    patch spec; a free-text description is no trigger) and the label its samples carry most
    often, the poisoned label, so requests with other triggers never share its job."""
    if isinstance(body, ClassRequest):
        return Scenario("class", forget_class=body.class_label)
    if not isinstance(body, BackdoorRequest):
        return Scenario("subset")
    dataset_id = select(Model.dataset_id).where(Model.id == model_id).scalar_subquery()
    labels = db_session.execute(
        select(Sample.label, func.count()).where(
            Sample.dataset_id == dataset_id, Sample.sample_key.in_(body.sample_keys),
            Sample.forgotten_at.is_(None))
        .group_by(Sample.label).order_by(func.count().desc(), Sample.label)).first()
    trigger = body.trigger.model_dump() if isinstance(body.trigger, BaseModel) else None
    return Scenario("backdoor", target_label=int(labels[0]) if labels else 0,
                    trigger=Trigger(**trigger) if trigger else None)


def fingerprint(body: AnyCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _payload(body: AnyCreate) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude={"kind", "model", "subject_ref"})


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
