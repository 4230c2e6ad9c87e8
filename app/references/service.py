"""Reference sets: asking for one, a worker's life cycle of building it, reading its gate half
for a job, and erasing a forgotten sample's statistics. The statistics themselves come from
the engine (``unlearning.verification.references``); this module keeps their rows."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, delete, func, insert, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import utcnow
from app.core.errors import Unprocessable
from app.models_registry import service as registry
from app.models_registry.engine_bridge import check_reference_count, reference_rows
from app.models_registry.models import Model, ModelVersion, Policy
from app.references.models import (
    ACTIVE_REFERENCE_STATUSES,
    ReferenceSet,
    ReferenceSetRead,
    ReferenceStatistic,
    ReferenceStatus,
)

ACTIVE = [s.value for s in ACTIVE_REFERENCE_STATUSES]
MAX_ATTEMPTS = 3
WAITING_REASON = ("waiting for reference statistics: the policy requires per-sample evidence "
                  "and the model has no ready reference set")


# ---- asking ---------------------------------------------------------------------------------


def request_build(db_session: Session, *, model: Model, actor: str,
                  references: int | None = None) -> tuple[ReferenceSet, bool]:
    """A queued reference set for ``model`` (the policy's size unless ``references`` says
    otherwise), or the one already queued or running; returns (set, created)."""
    k = references if references is not None else \
        Policy.model_validate(model.policy).verification.references
    try:
        check_reference_count(k)
    except ValueError as error:
        raise Unprocessable(str(error)) from error
    active = db_session.scalar(select(ReferenceSet).where(
        ReferenceSet.model_id == model.id, ReferenceSet.status.in_(ACTIVE)))
    if active is not None:
        return active, False
    served = registry.alias_target(db_session, model=model)
    reference_set = ReferenceSet(model_id=model.id, version_id=served.id if served else None,
                                 n_references=k, seed=random.SystemRandom().randrange(2**31),
                                 status=ReferenceStatus.queued.value, requested_by=actor,
                                 reference_seconds=[])
    db_session.add(reference_set)
    db_session.flush()
    audit.record(db_session, actor=actor, action="references.requested", entity_type="model",
                 entity_id=model.name, details={"set": reference_set.id, "references": k})
    db_session.commit()
    return reference_set, True


def build_on_register(db_session: Session, *, model: Model, actor: str) -> ReferenceSet | None:
    """After a version is uploaded: queue a reference set if the policy asks for it."""
    if not Policy.model_validate(model.policy).verification.build_references_on_register:
        return None
    reference_set, _ = request_build(db_session, model=model, actor=actor)
    return reference_set


# ---- reading ---------------------------------------------------------------------------------


def ready_set(db_session: Session, *, model_id: int) -> ReferenceSet | None:
    return db_session.scalar(select(ReferenceSet).where(
        ReferenceSet.model_id == model_id, ReferenceSet.status == ReferenceStatus.ready.value)
        .order_by(ReferenceSet.id.desc()).limit(1))


def list_sets(db_session: Session, *, model_id: int, limit: int = 20) -> list[ReferenceSet]:
    return list(db_session.scalars(select(ReferenceSet).where(
        ReferenceSet.model_id == model_id).order_by(ReferenceSet.id.desc()).limit(limit)))


def waiting_for_references(db_session: Session, *, model: Model) -> bool:
    """True when the model's requests must wait: the policy requires references and no set
    is ready."""
    if not Policy.model_validate(model.policy).verification.require_references:
        return False
    return ready_set(db_session, model_id=model.id) is None


def models_waiting(db_session: Session, model_ids: Iterable[int]) -> set[int]:
    """Of ``model_ids``, those whose requests wait for references."""
    waiting = set()
    for model_id in set(model_ids):
        model = db_session.get(Model, model_id)
        if model is not None and waiting_for_references(db_session, model=model):
            waiting.add(model_id)
    return waiting


def count_statistics(db_session: Session, set_ids: Sequence[int]) -> dict[int, int]:
    if not set_ids:
        return {}
    rows = db_session.execute(select(ReferenceStatistic.set_id, func.count())
                              .where(ReferenceStatistic.set_id.in_(set_ids))
                              .group_by(ReferenceStatistic.set_id))
    return {set_id: count for set_id, count in rows}


def count_by_status(db_session: Session) -> dict[str, int]:
    rows = db_session.execute(select(ReferenceSet.status, func.count())
                              .group_by(ReferenceSet.status))
    return {status: count for status, count in rows}


def to_read(db_session: Session, sets: Sequence[ReferenceSet]) -> list[ReferenceSetRead]:
    counts = count_statistics(db_session, [s.id for s in sets])
    out = []
    for s in sets:
        model = db_session.get(Model, s.model_id)
        version = db_session.get(ModelVersion, s.version_id) if s.version_id else None
        out.append(ReferenceSetRead(
            id=s.id, model=model.name if model else "?",
            version=version.number if version else None,
            status=ReferenceStatus(s.status), references=s.n_references, completed=s.completed,
            phase=s.phase, attempt=s.attempt, n_train=s.n_train, n_holdout=s.n_holdout,
            statistics=counts.get(s.id, 0), reference_seconds=list(s.reference_seconds or []),
            cost_seconds=round(sum(s.reference_seconds or []), 3), worker_host=s.worker_host,
            failure_reason=s.failure_reason, created_at=s.created_at, started_at=s.started_at,
            finished_at=s.finished_at))
    return out


def gate_statistics(db_session: Session, *, reference_set: ReferenceSet,
                    forget_ids: Sequence[int], holdout_ids: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The gate half's OUT values, ``[k/2, n]`` for the forget and the audit samples in the
    order given, NaN where a reference model trained on the sample or none was stored. The
    method half is never read here."""
    return _half_statistics(db_session, reference_set, "gate", forget_ids, holdout_ids)


def method_statistics(db_session: Session, *, reference_set: ReferenceSet,
                      forget_ids: Sequence[int], unseen_ids: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The method half's OUT values for the forget and the unseen samples, as
    :func:`gate_statistics` gives the gate's: what an unlearning method may read. The gate
    half is never read here."""
    return _half_statistics(db_session, reference_set, "method", forget_ids, unseen_ids)


def _half_statistics(db_session: Session, reference_set: ReferenceSet, half: str,
                     forget_ids: Sequence[int], holdout_ids: Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    rows = reference_rows(reference_set.n_references, half)
    row_of = {index: row for row, index in enumerate(rows)}

    def matrix(ids: Sequence[int]) -> np.ndarray:
        values = np.full((len(rows), len(ids)), np.nan)
        position = {sample_id: i for i, sample_id in enumerate(ids)}
        for chunk in range(0, len(ids), 5000):
            found = db_session.execute(
                select(ReferenceStatistic.sample_id, ReferenceStatistic.reference_index,
                       ReferenceStatistic.phi)
                .where(ReferenceStatistic.set_id == reference_set.id,
                       ReferenceStatistic.reference_index.in_(rows),
                       ReferenceStatistic.sample_id.in_(ids[chunk:chunk + 5000])))
            for sample_id, index, phi in found:
                values[row_of[index], position[sample_id]] = phi
        return values

    return matrix(forget_ids), matrix(holdout_ids)


# ---- building (the worker's side) ------------------------------------------------------------


def claim(db_session: Session, *, set_id: int, worker_host: str, heartbeat_timeout: float,
          n_train: int, n_holdout: int) -> tuple[ReferenceSet, set[int]] | None:
    """Take this delivery of a set, or None if it must not run (finished, alive elsewhere,
    out of attempts). Returns the set and the reference indices an earlier delivery already
    stored, which this one skips. If the training data changed since (a sample was erased),
    the earlier statistics are deleted and the set starts over."""
    now = utcnow()
    reference_set = db_session.scalar(select(ReferenceSet).where(ReferenceSet.id == set_id)
                                      .with_for_update())
    if reference_set is None or reference_set.status not in ACTIVE:
        db_session.rollback()
        return None
    if (reference_set.status == ReferenceStatus.running.value
            and reference_set.heartbeat_at is not None
            and now - reference_set.heartbeat_at < timedelta(seconds=heartbeat_timeout)):
        db_session.rollback()
        return None
    if reference_set.attempt >= MAX_ATTEMPTS:
        _fail(db_session, reference_set, f"gave up after {reference_set.attempt} deliveries")
        db_session.commit()
        return None
    if reference_set.n_train is not None and (reference_set.n_train, reference_set.n_holdout) \
            != (n_train, n_holdout):
        _restart(db_session, reference_set)
    reference_set.n_train, reference_set.n_holdout = n_train, n_holdout
    reference_set.attempt += 1
    reference_set.status, reference_set.worker_host = ReferenceStatus.running.value, worker_host
    reference_set.started_at = reference_set.started_at or now
    reference_set.heartbeat_at, reference_set.phase = now, "starting"
    done = set(db_session.scalars(select(ReferenceStatistic.reference_index).distinct().where(
        ReferenceStatistic.set_id == set_id)))
    db_session.commit()
    return reference_set, done


def _restart(db_session: Session, reference_set: ReferenceSet) -> None:
    db_session.execute(delete(ReferenceStatistic).where(
        ReferenceStatistic.set_id == reference_set.id))
    reference_set.completed, reference_set.reference_seconds = 0, []


def store_reference(db_session: Session, *, set_id: int, index: int,
                    rows: Sequence[tuple[int, float]], seconds: float) -> None:
    """One reference model's statistics ((sample id, phi) for each OUT sample), stored whole
    in one transaction, so a delivery killed mid-way leaves whole models or none."""
    reference_set = db_session.get(ReferenceSet, set_id)
    assert reference_set is not None
    db_session.execute(delete(ReferenceStatistic).where(
        ReferenceStatistic.set_id == set_id, ReferenceStatistic.reference_index == index))
    db_session.execute(insert(ReferenceStatistic), [
        {"set_id": set_id, "sample_id": sample_id, "reference_index": index, "phi": phi}
        for sample_id, phi in rows])
    reference_set.completed = len(set(db_session.scalars(
        select(ReferenceStatistic.reference_index).distinct().where(
            ReferenceStatistic.set_id == set_id))))
    reference_set.reference_seconds = [*(reference_set.reference_seconds or []),
                                       round(seconds, 3)]
    reference_set.heartbeat_at = utcnow()
    db_session.commit()


def heartbeat(db_session: Session, *, set_id: int, phase: str | None = None) -> None:
    """A running set's worker is alive (and, with ``phase``, where it is)."""
    values: dict[str, object] = {"heartbeat_at": utcnow()}
    if phase:
        values["phase"] = phase[:64]
    db_session.execute(update(ReferenceSet).where(
        ReferenceSet.id == set_id, ReferenceSet.status == ReferenceStatus.running.value)
        .values(**values))
    db_session.commit()


def finish(db_session: Session, *, set_id: int) -> ReferenceSet:
    """The set is ready; older sets of the model are superseded and their rows deleted."""
    reference_set = db_session.get(ReferenceSet, set_id)
    assert reference_set is not None
    reference_set.status, reference_set.phase = ReferenceStatus.ready.value, "ready"
    reference_set.finished_at = utcnow()
    older = list(db_session.scalars(select(ReferenceSet.id).where(
        ReferenceSet.model_id == reference_set.model_id, ReferenceSet.id != set_id,
        ReferenceSet.status == ReferenceStatus.ready.value)))
    if older:
        db_session.execute(delete(ReferenceStatistic).where(
            ReferenceStatistic.set_id.in_(older)))
        db_session.execute(update(ReferenceSet).where(ReferenceSet.id.in_(older))
                           .values(status=ReferenceStatus.superseded.value))
    model = db_session.get(Model, reference_set.model_id)
    audit.record(db_session, actor="system", action="references.ready", entity_type="model",
                 entity_id=model.name if model else str(reference_set.model_id),
                 details={"set": set_id, "references": reference_set.n_references,
                          "seconds": round(sum(reference_set.reference_seconds or []), 3)})
    db_session.commit()
    return reference_set


def fail(db_session: Session, *, set_id: int, reason: str) -> None:
    reference_set = db_session.get(ReferenceSet, set_id)
    if reference_set is not None and reference_set.status in ACTIVE:
        _fail(db_session, reference_set, reason)
    db_session.commit()


def _fail(db_session: Session, reference_set: ReferenceSet, reason: str) -> None:
    """Failed: its partial statistics go (they back no decision)."""
    _restart(db_session, reference_set)
    reference_set.status, reference_set.failure_reason = ReferenceStatus.failed.value, reason
    reference_set.finished_at = utcnow()


def requeue_lost(db_session: Session, *, heartbeat_timeout: float) -> list[int]:
    """Running sets whose worker stopped heart-beating go back to `queued`."""
    cutoff = utcnow() - timedelta(seconds=heartbeat_timeout)
    stale = db_session.scalars(select(ReferenceSet).where(
        ReferenceSet.status == ReferenceStatus.running.value,
        ReferenceSet.heartbeat_at < cutoff).with_for_update(skip_locked=True)).all()
    for reference_set in stale:
        reference_set.status, reference_set.phase = (ReferenceStatus.queued.value,
                                                     "requeued: worker lost")
    db_session.commit()
    return [s.id for s in stale]


def undispatched(db_session: Session, *, older_than: float) -> list[int]:
    cutoff = utcnow() - timedelta(seconds=older_than)
    ids = list(db_session.scalars(select(ReferenceSet.id).where(
        ReferenceSet.status == ReferenceStatus.queued.value,
        ReferenceSet.dispatched_at.is_(None) | (ReferenceSet.dispatched_at < cutoff))))
    db_session.rollback()
    return ids


def mark_dispatched(db_session: Session, set_ids: Iterable[int]) -> None:
    ids = list(set_ids)
    if ids:
        db_session.execute(update(ReferenceSet).where(ReferenceSet.id.in_(ids))
                           .values(dispatched_at=utcnow()))
        db_session.commit()


# ---- erasure --------------------------------------------------------------------------------


def erase_samples(db_session: Session, sample_ids: Sequence[int]) -> int:
    """Delete every statistic of these samples; part of the caller's transaction (the one
    that tombstones them). Returns the rows deleted."""
    deleted = 0
    for chunk in range(0, len(sample_ids), 5000):
        result = cast(CursorResult[Any], db_session.execute(delete(ReferenceStatistic).where(
            ReferenceStatistic.sample_id.in_(sample_ids[chunk:chunk + 5000]))))
        deleted += result.rowcount or 0
    return deleted
