"""The deletion-request lifecycle as tables (app/requests/lifecycle.py): every transition of a
request and of a target the lifecycle allows, and every one it refuses, over all pairs of
statuses; and moving targets by compare-and-set."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.models import AuditEvent
from app.core.db import make_engine, make_sessionmaker, session_scope, utcnow
from app.core.errors import Conflict
from app.datasets import service as datasets
from app.datasets.models import DatasetCreate
from app.models_registry.models import Model, Policy
from app.requests import lifecycle
from app.requests.models import DeletionRequest, DeletionTarget, RequestStatus, TargetStatus

R, T = RequestStatus, TargetStatus
# What the lifecycle allows, written out: the tests hold lifecycle.py to it.
REQUEST_MOVES = {
    (R.received, R.queued), (R.received, R.awaiting_approval), (R.received, R.rejected),
    (R.received, R.canceled),
    (R.awaiting_approval, R.queued), (R.awaiting_approval, R.rejected),
    (R.awaiting_approval, R.canceled),
    (R.queued, R.processing), (R.queued, R.canceled), (R.queued, R.completed),
    (R.queued, R.failed),
    (R.processing, R.verifying), (R.processing, R.queued), (R.processing, R.failed),
    (R.processing, R.completed),
    (R.verifying, R.completed), (R.verifying, R.failed), (R.verifying, R.processing),
    (R.verifying, R.queued),
    (R.failed, R.queued), (R.failed, R.processing), (R.failed, R.completed),
}
TARGET_MOVES = {
    (T.awaiting_approval, T.queued), (T.awaiting_approval, T.denied),
    (T.awaiting_approval, T.canceled),
    (T.queued, T.processing), (T.queued, T.canceled), (T.queued, T.failed),
    (T.processing, T.processing), (T.processing, T.verifying), (T.processing, T.completed),
    (T.processing, T.failed),
    (T.verifying, T.processing), (T.verifying, T.completed), (T.verifying, T.failed),
    (T.failed, T.queued),
}


@pytest.fixture(scope="module")
def sessions(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[sessionmaker[Session]]:
    """One database for the module, with a model for each target a request may have."""
    path = tmp_path_factory.mktemp("lifecycle") / "lethe.db"
    shutil.copy(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    factory = make_sessionmaker(engine)
    with session_scope(factory) as db_session:
        _models(db_session, len(TargetStatus))
    yield factory
    engine.dispose()


def _models(db_session: Session, count: int) -> None:
    dataset = datasets.create(db_session, dataset_in=DatasetCreate(name="digits"),
                              actor="system")
    db_session.add_all([Model(name=f"model-{i}", architecture={"name": "mlp"},
                              dataset_id=dataset.id, policy=Policy().model_dump(mode="json"))
                        for i in range(count)])
    db_session.commit()


def _request(db_session: Session, status: RequestStatus,
             targets: tuple[TargetStatus, ...] = ()) -> DeletionRequest:
    now = utcnow()
    request = DeletionRequest(
        id=str(uuid.uuid4()), client_id="acme", api_key_id=None, kind="subject",
        subject_hash="h", payload={}, fingerprint="f", status=status.value, received_at=now,
        updated_at=now, due_at=now)
    db_session.add(request)
    models = db_session.scalars(select(Model.id).order_by(Model.id)).all()
    db_session.add_all([DeletionTarget(request_id=request.id, model_id=model_id,
                                       status=status.value, scenario="subset", updated_at=now)
                        for status, model_id in zip(targets, models, strict=False)])
    db_session.commit()
    return request


def _events(db_session: Session, request: DeletionRequest) -> list[str]:
    return list(db_session.scalars(select(AuditEvent.action).where(
        AuditEvent.entity_id == request.id).order_by(AuditEvent.seq)))


@pytest.mark.parametrize(("current", "to"), list(product(RequestStatus, RequestStatus)))
def test_a_request_makes_exactly_the_transitions_the_table_allows(
        sessions: sessionmaker[Session], current: RequestStatus, to: RequestStatus) -> None:
    with session_scope(sessions) as db_session:
        request = _request(db_session, current)
        if current == to:  # staying put is no transition: nothing recorded
            lifecycle.transition(db_session, request, to, "key:test")
            db_session.commit()
            assert _events(db_session, request) == []
        elif (current, to) in REQUEST_MOVES:
            lifecycle.transition(db_session, request, to, "key:test")
            db_session.commit()
            assert request.status == to
            assert getattr(request, f"{to.value}_at") is not None
            assert _events(db_session, request) == [f"deletion_request.{to.value}"]
        else:
            with pytest.raises(Conflict):
                lifecycle.transition(db_session, request, to, "key:test")
            db_session.rollback()
            assert request.status == current and _events(db_session, request) == []
        assert lifecycle.request_may_become(current, to) == (
            current == to or (current, to) in REQUEST_MOVES)


@pytest.mark.parametrize(("current", "to"), list(product(TargetStatus, TargetStatus)))
def test_a_target_makes_exactly_the_transitions_the_table_allows(
        sessions: sessionmaker[Session], current: TargetStatus, to: TargetStatus) -> None:
    with session_scope(sessions) as db_session:
        request = _request(db_session, R.queued, (current,))
        if (current, to) in TARGET_MOVES:
            moved = lifecycle.move_targets(db_session, request_id=request.id, from_={current},
                                           to=to)
            assert moved == [request.id]
        else:
            with pytest.raises(ValueError, match=f"cannot become {to.value}"):
                lifecycle.move_targets(db_session, request_id=request.id, from_={current},
                                       to=to)
        db_session.commit()
        (target,) = lifecycle.targets_of(db_session, request_id=request.id)
        assert target.status == (to if (current, to) in TARGET_MOVES else current)


@pytest.mark.parametrize("to", list(TargetStatus))
def test_a_move_by_default_takes_every_target_the_table_lets_become_its_status(
        sessions: sessionmaker[Session], to: TargetStatus) -> None:
    with session_scope(sessions) as db_session:
        request = _request(db_session, R.queued, tuple(TargetStatus))
        moved = lifecycle.move_targets(db_session, request_id=request.id, to=to)
        db_session.commit()
        after = [t.status for t in lifecycle.targets_of(db_session, request_id=request.id)]
        sources = {current for current, target in TARGET_MOVES if target == to}
        assert after == [to if before in sources else before for before in TargetStatus]
        assert moved == ([request.id] if sources else [])


@pytest.mark.postgres
def test_a_move_waiting_on_another_transaction_does_not_overwrite_what_that_one_wrote(
        postgres_url: str) -> None:
    """Compare-and-set: a worker claiming a target while a client's cancel of it is in flight
    waits for the cancel to commit, then finds the target no longer queued and leaves it
    canceled. (A read followed by a write by primary key would have read `queued` before the
    cancel committed and overwritten it. PostgreSQL only: SQLite runs one writer at a time.)"""
    engine = make_engine(postgres_url)
    factory = make_sessionmaker(engine)
    with session_scope(factory) as setup:
        _models(setup, 1)
        request_id = _request(setup, R.queued, (T.queued,)).id
    with session_scope(factory) as client, session_scope(factory) as worker:
        assert lifecycle.move_targets(client, request_id=request_id,
                                      to=T.canceled) == [request_id]  # not committed yet
        with ThreadPoolExecutor(1) as pool:
            claim = pool.submit(lifecycle.move_targets, worker, request_id=request_id,
                                from_={T.queued}, to=T.processing)
            time.sleep(0.5)  # the worker's UPDATE now waits on the client's row lock
            client.commit()
            assert claim.result(timeout=30) == []
        worker.commit()
        (target,) = lifecycle.targets_of(worker, request_id=request_id)
        assert target.status == T.canceled
    engine.dispose()


def test_a_request_follows_its_slowest_open_target_then_what_its_targets_ended_as() -> None:
    assert lifecycle.derive_status(["verifying", "queued", "completed"]) == (R.queued, None)
    assert lifecycle.derive_status(["completed", "failed"]) == (R.failed, "failed")
    assert lifecycle.derive_status(["completed", "canceled"]) == (R.completed, "forgotten")
    assert lifecycle.derive_status(["denied", "canceled"]) == (R.rejected, "denied")
    assert lifecycle.derive_status(["canceled"]) == (R.canceled, "canceled")
