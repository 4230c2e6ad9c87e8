"""Intake by group commit: ``POST /v1/deletion-requests`` authenticates, checks and records
the requests that arrive together in one transaction (app/core/group_commit.py).

Intake is the service's hot path, and a request's own work is small next to what each
transaction costs: a connection checkout, a round trip per query, the audit chain's lock, the
COMMIT. A batch pays those once. Every request still gets exactly the answer it would have
had alone (its request, its replay, or its own problem), and only after the commit that
recorded it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from sqlalchemy.orm import Session, sessionmaker

from app.auth import service as auth
from app.core.errors import Problem
from app.core.group_commit import GroupCommit
from app.requests import service
from app.requests.service import AnyCreate, Submission, Submitted

MAX_BATCH = 64


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
            for i, answer in zip(admitted, service.submit_many(
                    db_session, submissions, secret_key=secret_key), strict=True):
                answers[i] = answer
        db_session.commit()  # the keys' last-used times, where nothing else committed them
    return [answer for answer in answers if answer is not None]


def group_committer(factory: sessionmaker[Session], secret_key: bytes
                    ) -> GroupCommit[Presented, Submitted]:
    return GroupCommit(partial(record_batch, factory, secret_key), max_batch=MAX_BATCH)
