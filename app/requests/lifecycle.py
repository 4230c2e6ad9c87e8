"""The deletion-request lifecycle: which transitions a request and its targets may make, the
one helper that moves targets, and the transitions a client or an operator asks for (cancel,
approve, deny, retry). Intake (intake.py) and the jobs (app/jobs/flows.py) move requests and
targets only through this module.

    received -> queued -> processing -> verifying -> completed
        |   \\-> awaiting_approval -> queued | rejected (denied)
        |          \\-> canceled (before processing)       \\-> failed -> queued (retry)
        \\-> rejected (nothing held: outcome no_data)

A request has one target per model it covers; the request is as far along as its slowest open
target (`derive_status`). Every request transition sets its timestamp and writes its audit
event and webhook deliveries in the caller's transaction."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import utcnow
from app.core.errors import Conflict
from app.requests.models import (
    DeletionRequest,
    DeletionTarget,
    Outcome,
    RequestStatus,
    TargetStatus,
)
from app.webhooks import service as webhooks

# The request transitions the lifecycle allows; anything else is a 409. Staying put is no
# transition at all.
REQUEST_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.received: frozenset({RequestStatus.queued, RequestStatus.awaiting_approval,
                                       RequestStatus.rejected, RequestStatus.canceled}),
    RequestStatus.awaiting_approval: frozenset({RequestStatus.queued, RequestStatus.rejected,
                                                RequestStatus.canceled}),
    RequestStatus.queued: frozenset({RequestStatus.processing, RequestStatus.canceled,
                                     RequestStatus.completed, RequestStatus.failed}),
    RequestStatus.processing: frozenset({RequestStatus.verifying, RequestStatus.queued,
                                         RequestStatus.failed, RequestStatus.completed}),
    RequestStatus.verifying: frozenset({RequestStatus.completed, RequestStatus.failed,
                                        RequestStatus.processing, RequestStatus.queued}),
    RequestStatus.failed: frozenset({RequestStatus.queued, RequestStatus.processing,
                                     RequestStatus.completed}),
    RequestStatus.completed: frozenset(),
    RequestStatus.canceled: frozenset(),
    RequestStatus.rejected: frozenset(),
}
# The target transitions the lifecycle allows; `move_targets` refuses any other.
TARGET_TRANSITIONS: dict[TargetStatus, frozenset[TargetStatus]] = {
    # approve, deny, cancel
    TargetStatus.awaiting_approval: frozenset({TargetStatus.queued, TargetStatus.denied,
                                               TargetStatus.canceled}),
    # a job claims it, the client cancels it, or its job fails before starting
    TargetStatus.queued: frozenset({TargetStatus.processing, TargetStatus.canceled,
                                    TargetStatus.failed}),
    # processing again: the next delivery of a job whose worker was lost claims it anew
    TargetStatus.processing: frozenset({TargetStatus.processing, TargetStatus.verifying,
                                        TargetStatus.completed, TargetStatus.failed}),
    # back to processing: escalation, or the next delivery of a lost job
    TargetStatus.verifying: frozenset({TargetStatus.processing, TargetStatus.completed,
                                       TargetStatus.failed}),
    TargetStatus.failed: frozenset({TargetStatus.queued}),  # an operator's retry
    TargetStatus.completed: frozenset(),
    TargetStatus.canceled: frozenset(),
    TargetStatus.denied: frozenset(),
}
# Open targets, least advanced first: a request is as far along as its slowest target.
TARGET_PROGRESS = [TargetStatus.awaiting_approval, TargetStatus.queued, TargetStatus.processing,
                   TargetStatus.verifying]


def request_may_become(current: RequestStatus, to: RequestStatus) -> bool:
    return to == current or to in REQUEST_TRANSITIONS[current]


def target_sources(to: TargetStatus) -> frozenset[TargetStatus]:
    """Every status a target may become ``to`` from."""
    return frozenset(s for s, targets in TARGET_TRANSITIONS.items() if to in targets)


CANCELABLE_REQUESTS = frozenset(s.value for s in RequestStatus
                                if RequestStatus.canceled in REQUEST_TRANSITIONS[s])


# ---- requests -----------------------------------------------------------------------------


def audit_event(db_session: Session, request: DeletionRequest, actor: str, what: str,
                details: dict[str, Any] | None = None) -> None:
    audit.record(db_session, actor=actor, action=f"deletion_request.{what}",
                 entity_type="deletion_request", entity_id=request.id, details=details or {})


def transition(db_session: Session, request: DeletionRequest, to: RequestStatus, actor: str,
               *, now: datetime | None = None, details: dict[str, Any] | None = None,
               subscribed: bool = True) -> None:
    """Move the request to ``to`` with its timestamp, audit event and webhook deliveries;
    a transition REQUEST_TRANSITIONS does not allow is a 409. ``subscribed`` False: the caller
    knows the client has no webhooks."""
    current = RequestStatus(request.status)
    if to == current:
        return
    if not request_may_become(current, to):
        raise Conflict(f"A {current.value} request cannot become {to.value}.",
                       current_status=current.value)
    now = now or utcnow()
    request.status = to.value
    request.updated_at = now
    setattr(request, f"{to.value}_at", now)
    audit_event(db_session, request, actor, to.value, {"from": current.value, **(details or {})})
    webhooks.enqueue(db_session, client_id=request.client_id,
                     event=f"deletion_request.{to.value}",
                     payload={"id": request.id, "status": to.value, "outcome": request.outcome,
                              "previous_status": current.value, "at": now.isoformat()},
                     subscribed=subscribed)


def derive_status(statuses: Iterable[str]) -> tuple[RequestStatus, Outcome | None]:
    """A request is as far along as its slowest open target; once none is open, its outcome
    is decided by what its targets ended as."""
    targets = [TargetStatus(s) for s in statuses]
    open_ = [s for s in targets if s in TARGET_PROGRESS]
    if open_:
        slowest = min(open_, key=TARGET_PROGRESS.index)
        return RequestStatus(slowest.value), None
    if TargetStatus.failed in targets:
        return RequestStatus.failed, Outcome.failed
    if TargetStatus.completed in targets:
        return RequestStatus.completed, Outcome.forgotten
    if TargetStatus.denied in targets:
        return RequestStatus.rejected, Outcome.denied
    return RequestStatus.canceled, Outcome.canceled


def sync_status(db_session: Session, request: DeletionRequest, *, actor: str,
                now: datetime | None = None, details: dict[str, Any] | None = None) -> None:
    """Bring a request's status in line with its targets (after targets changed)."""
    db_session.flush()
    status, outcome = derive_status(t.status for t in targets_of(db_session,
                                                                  request_id=request.id))
    request.outcome = outcome.value if outcome else None
    transition(db_session, request, status, actor, now=now, details=details)


def sync_statuses(db_session: Session, request_ids: Iterable[str], *, actor: str,
                  details: dict[str, Any] | None = None) -> None:
    """`sync_status` for each of the requests, in id order."""
    for request_id in sorted(set(request_ids)):
        request = db_session.get(DeletionRequest, request_id)
        if request is not None:
            sync_status(db_session, request, actor=actor, details=details)


# ---- targets ------------------------------------------------------------------------------


def _of(request_id: str | None, job_id: str | None) -> ColumnElement[bool]:
    if (request_id is None) == (job_id is None):
        raise TypeError("name either a request or a job")
    if request_id is not None:
        return DeletionTarget.request_id == request_id
    return DeletionTarget.job_id == job_id


def targets_of(db_session: Session, *, request_id: str | None = None,
               job_id: str | None = None) -> list[DeletionTarget]:
    """The targets of one request, or of one job, in the order they were recorded."""
    return list(db_session.scalars(select(DeletionTarget).where(_of(request_id, job_id))
                                   .order_by(DeletionTarget.id)))


def move_targets(db_session: Session, *, to: TargetStatus, request_id: str | None = None,
                 job_id: str | None = None, request_ids: Collection[str] | None = None,
                 from_: Collection[TargetStatus] | None = None,
                 values: dict[str, Any] | None = None) -> list[str]:
    """Move the targets of one request, or of one job (only those of ``request_ids`` if
    given), that are in ``from_`` to ``to``, writing ``values`` beside the status. Returns
    the requests of the targets moved, sorted, each once.

    ``from_`` defaults to every status TARGET_TRANSITIONS lets become ``to``; a narrower set
    picks one way in where there are several (approval and retry both queue). A move the
    table does not allow is a programming error: ValueError, nothing written.

    Concurrency: compare-and-set. One UPDATE whose WHERE checks the status, so of two
    transactions moving the same target (a worker claiming it, a client canceling it) the
    later one re-reads the row the earlier committed and moves it only if it is still in
    ``from_``: neither overwrites the other, whatever locks either holds."""
    sources = target_sources(to) if from_ is None else frozenset(from_)
    if not sources <= target_sources(to):
        refused = sorted(s.value for s in sources - target_sources(to))
        raise ValueError(f"a target cannot become {to.value} from {', '.join(refused)}")
    condition = _of(request_id, job_id)
    if request_ids is not None:
        condition = condition & DeletionTarget.request_id.in_(list(request_ids))
    db_session.flush()  # the caller's pending changes first: the UPDATE goes around the ORM
    moved = db_session.execute(
        update(DeletionTarget)
        .where(condition, DeletionTarget.status.in_(sorted(s.value for s in sources)))
        .values(status=to.value, updated_at=utcnow(), **(values or {}))
        .returning(DeletionTarget.request_id)
        .execution_options(synchronize_session=False)).scalars().all()
    for loaded in list(db_session.identity_map.values()):
        if isinstance(loaded, DeletionTarget):
            db_session.expire(loaded)  # read again from the row when next used
    return sorted(set(moved))


# ---- transitions a client or an operator asks for ------------------------------------------


def cancel(db_session: Session, *, request: DeletionRequest, actor: str) -> DeletionRequest:
    if request.status not in CANCELABLE_REQUESTS:
        raise Conflict(f"A {request.status} request can no longer be canceled; only requests "
                       "that have not started processing can.", current_status=request.status)
    move_targets(db_session, request_id=request.id, to=TargetStatus.canceled)
    if any(t.status != TargetStatus.canceled for t in targets_of(db_session,
                                                                  request_id=request.id)):
        db_session.rollback()
        raise Conflict("Processing started meanwhile; the request can no longer be canceled.")
    request.outcome = Outcome.canceled.value
    transition(db_session, request, RequestStatus.canceled, actor)
    db_session.commit()
    return request


def approve(db_session: Session, *, request: DeletionRequest, actor: str) -> DeletionRequest:
    if request.status != RequestStatus.awaiting_approval:
        raise Conflict(f"Only requests awaiting approval can be approved; this one is "
                       f"{request.status}.", current_status=request.status)
    now = utcnow()
    move_targets(db_session, request_id=request.id, from_={TargetStatus.awaiting_approval},
                 to=TargetStatus.queued, values={"queued_at": now})
    sync_status(db_session, request, actor=actor, now=now, details={"approved": True})
    db_session.commit()
    return request


def deny(db_session: Session, *, request: DeletionRequest, reason: str, actor: str
         ) -> DeletionRequest:
    if request.status != RequestStatus.awaiting_approval:
        raise Conflict(f"Only requests awaiting approval can be denied; this one is "
                       f"{request.status}.", current_status=request.status)
    move_targets(db_session, request_id=request.id, to=TargetStatus.denied,
                 values={"failure_reason": reason})
    request.reason = reason
    sync_status(db_session, request, actor=actor, details={"reason": reason})
    db_session.commit()
    return request


def retry(db_session: Session, *, request: DeletionRequest, actor: str) -> DeletionRequest:
    if request.status != RequestStatus.failed:
        raise Conflict(f"Only failed requests can be retried; this one is {request.status}.",
                       current_status=request.status)
    now = utcnow()
    move_targets(db_session, request_id=request.id, from_={TargetStatus.failed},
                 to=TargetStatus.queued,
                 values={"job_id": None, "failure_reason": None, "queued_at": now})
    request.reason = None
    sync_status(db_session, request, actor=actor, now=now, details={"retry": True})
    db_session.commit()
    return request
