"""Appending to and verifying the hash-chained audit log.

``record`` only queues an event on the session; the events are chained and inserted when the
session commits, under a lock that serialises appenders (a PostgreSQL advisory lock; SQLite
transactions already hold the write lock). Taking the lock last, just before commit, keeps it
short and means it is never held while waiting on anything else, so it cannot deadlock.

On PostgreSQL every appender queues behind that lock, so the time it is held bounds the
throughput of everything that writes. It is held for no client round trip: the lock, the
inserts and the COMMIT go to the server in one pipeline, and PostgreSQL itself reads the chain
head and computes each hash, from the same canonical form ``compute_hash`` uses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Engine, event, or_, select, text
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent, BrokenLink, ChainVerification
from app.core.db import utcnow

GENESIS_HASH = "0" * 64
_PENDING = "audit_pending"
# Arbitrary constant naming the audit chain's advisory lock in PostgreSQL.
_CHAIN_LOCK_KEY = 0x1E7E_A0D1


def record(
    db_session: Session, *, actor: str, action: str, entity_type: str, entity_id: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Queue an audit event; it is written in the same transaction as the change it records."""
    # A JSON round trip now, so what is hashed is exactly what the database will return.
    normalised = json.loads(json.dumps(details or {}, default=str))
    db_session.info.setdefault(_PENDING, []).append(
        dict(occurred_at=utcnow(), actor=actor, action=action, entity_type=entity_type,
             entity_id=str(entity_id), details=normalised)
    )


def _timestamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_before_seq(*, occurred_at: datetime, actor: str, action: str,
                          entity_type: str, entity_id: str, details: dict[str, Any]) -> str:
    """An event's canonical JSON up to its seq. "seq" sorts last among the keys, so the whole
    form is this, the number and "}": whoever knows the seq (PostgreSQL, under the chain lock)
    can finish it."""
    body = json.dumps(
        {"occurred_at": _timestamp(occurred_at), "actor": actor, "action": action,
         "entity_type": entity_type, "entity_id": entity_id, "details": details},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )
    return body[:-1] + ',"seq":'


def compute_hash(prev_hash: str, *, seq: int, occurred_at: datetime, actor: str, action: str,
                 entity_type: str, entity_id: str, details: dict[str, Any]) -> str:
    canonical = _canonical_before_seq(
        occurred_at=occurred_at, actor=actor, action=action, entity_type=entity_type,
        entity_id=entity_id, details=details) + f"{seq}}}"
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


# One event after the chain's head (the genesis when there is none), hashed by PostgreSQL as
# compute_hash does. Each statement reads the head afresh, after the lock and the events
# before it in the same transaction.
_APPEND_AFTER_HEAD = f"""
WITH last AS (SELECT seq, hash FROM {AuditEvent.__tablename__} ORDER BY seq DESC LIMIT 1),
     head AS (SELECT seq, hash FROM last
              UNION ALL SELECT 0, %(genesis)s WHERE NOT EXISTS (SELECT FROM last))
INSERT INTO {AuditEvent.__tablename__}
    (seq, occurred_at, actor, action, entity_type, entity_id, details, prev_hash, hash)
SELECT head.seq + 1, %(occurred_at)s, %(actor)s, %(action)s, %(entity_type)s, %(entity_id)s,
       %(details)s, head.hash,
       encode(sha256(convert_to(
           head.hash || %(canonical_before_seq)s || (head.seq + 1)::text || '}}', 'UTF8')), 'hex')
FROM head
"""


def _append_and_commit_postgresql(db_session: Session, pending: list[dict[str, Any]]) -> None:
    """Lock, append and COMMIT in one round trip, so the lock is released as soon as the
    server has committed, not after the client has answered several times. SQLAlchemy's own
    COMMIT, which follows, finds the transaction closed and sends nothing."""
    dbapi_connection = cast(psycopg.Connection[Any],
                            db_session.connection().connection.dbapi_connection)
    rows = [{**item, "details": Jsonb(item["details"]), "genesis": GENESIS_HASH,
             "canonical_before_seq": _canonical_before_seq(**item)} for item in pending]
    with dbapi_connection.pipeline(), dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_KEY,))
        cursor.executemany(_APPEND_AFTER_HEAD, rows)
        dbapi_connection.commit()


def _append_pending(db_session: Session) -> None:
    pending = db_session.info.pop(_PENDING, None)
    if not pending:
        return
    db_session.flush()  # everything else first, so the lock is held only for the append
    bind = db_session.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    # Committing is ours to do only when this commit ends the transaction: not when it
    # releases a savepoint, nor when the session joined a connection someone else commits.
    if postgresql and isinstance(bind, Engine) and not db_session.in_nested_transaction():
        _append_and_commit_postgresql(db_session, pending)
        return
    if postgresql:  # the append waits, under the lock, for the commit that ends it all
        db_session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK_KEY})
    head = db_session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
    for item in pending:
        seq += 1
        digest = compute_hash(prev_hash, seq=seq, **item)
        db_session.add(AuditEvent(seq=seq, prev_hash=prev_hash, hash=digest, **item))
        prev_hash = digest


@event.listens_for(Session, "before_commit")
def _before_commit(db_session: Session) -> None:
    _append_pending(db_session)


@event.listens_for(Session, "after_rollback")
def _after_rollback(db_session: Session) -> None:
    db_session.info.pop(_PENDING, None)


def iter_events(db_session: Session, *, batch: int = 1000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = list(db_session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ))
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify_chain(db_session: Session) -> ChainVerification:
    """Recompute every hash in order; name the first row that does not fit the chain."""
    prev_hash, expected_seq, checked = GENESIS_HASH, 1, 0
    for row in iter_events(db_session):
        broken = None
        if row.seq != expected_seq:
            broken = BrokenLink(seq=expected_seq, reason=f"missing: next row is {row.seq}")
        elif row.prev_hash != prev_hash:
            broken = BrokenLink(seq=row.seq, reason="prev_hash does not match the previous row")
        elif row.hash != compute_hash(
            prev_hash, seq=row.seq, occurred_at=row.occurred_at, actor=row.actor,
            action=row.action, entity_type=row.entity_type, entity_id=row.entity_id,
            details=row.details,
        ):
            broken = BrokenLink(seq=row.seq, reason="hash mismatch: the row was altered")
        if broken is not None:
            return ChainVerification(ok=False, checked=checked, head_hash=prev_hash,
                                     first_broken=broken)
        prev_hash, expected_seq, checked = row.hash, row.seq + 1, checked + 1
    return ChainVerification(ok=True, checked=checked,
                             head_hash=None if checked == 0 else prev_hash)


def list_events(
    db_session: Session, *, after_seq: int = 0, limit: int = 100, action: str | None = None,
    entity_type: str | None = None, entity_id: str | None = None,
) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.seq > after_seq)
    if action:
        query = query.where(AuditEvent.action == action)
    if entity_type:
        query = query.where(AuditEvent.entity_type == entity_type)
    if entity_id:
        query = query.where(AuditEvent.entity_id == entity_id)
    return list(db_session.scalars(query.order_by(AuditEvent.seq).limit(limit)))


def list_recent(
    db_session: Session, *, before_seq: int | None = None, limit: int = 100,
    action: str | None = None, entity_type: str | None = None, entity_id: str | None = None,
) -> list[AuditEvent]:
    """Newest first: the events before ``before_seq`` (all, when None)."""
    query = select(AuditEvent)
    if before_seq is not None:
        query = query.where(AuditEvent.seq < before_seq)
    if action:
        query = query.where(AuditEvent.action == action)
    if entity_type:
        query = query.where(AuditEvent.entity_type == entity_type)
    if entity_id:
        query = query.where(AuditEvent.entity_id == entity_id)
    return list(db_session.scalars(query.order_by(AuditEvent.seq.desc()).limit(limit)))


def events_of(db_session: Session, *, entities: list[tuple[str, str]], limit: int = 500
              ) -> list[AuditEvent]:
    """The events about any of ``entities`` ((entity_type, entity_id) pairs), oldest first."""
    if not entities:
        return []
    about = or_(*[(AuditEvent.entity_type == kind) & (AuditEvent.entity_id == str(ident))
                  for kind, ident in entities])
    return list(db_session.scalars(select(AuditEvent).where(about)
                                   .order_by(AuditEvent.seq).limit(limit)))
