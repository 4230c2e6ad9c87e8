"""What the fault-injection tests set up and check through the database directly: API keys,
a small model to send requests against, and the invariants that must hold after a crash."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.models import AuditEvent
from app.auth import service as keys
from app.auth.models import Role
from app.core.db import make_engine, make_sessionmaker, session_scope
from app.requests.models import DeletionRequest
from tests.api.seed import seed_model

ROLES = (("operator", "ops"), ("requester", "acme"), ("auditor", "compliance"))
SMALL_MODEL = "digits-mlp"
SUBJECTS = [f"customer-{n}" for n in range(5)]  # those tests/api/seed.py's manifest holds


@contextmanager
def database(url: str) -> Iterator[Session]:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with session_scope(make_sessionmaker(engine)) as db_session:
            yield db_session
    finally:
        engine.dispose()


def make_keys(url: str) -> dict[str, dict[str, str]]:
    """An Authorization header per role."""
    headers = {}
    with database(url) as db_session:
        for role, client_id in ROLES:
            plain = keys.create(db_session, role=Role(role), client_id=client_id)[1]
            headers[role] = {"Authorization": f"Bearer {plain}"}
    return headers


def seed_small_model(api: httpx.Client, operator: dict[str, str]) -> None:
    """A dataset whose subjects customer-0..4 each hold training samples, and a model on it
    (no weights: intake only needs the registry)."""
    seed_model(api, operator)


def check_acknowledged(url: str, acknowledged: dict[str, str]) -> int:
    """Every acknowledged request (Idempotency-Key -> id) is stored under its key, with the
    audit events of its intake, exactly once; the audit chain verifies end to end. Returns how
    many requests the database holds."""
    with database(url) as db_session:
        stored = {key: request_id for key, request_id in db_session.execute(
            select(DeletionRequest.idempotency_key, DeletionRequest.id))}
        events: dict[str, list[str]] = defaultdict(list)
        for entity_id, action in db_session.execute(
                select(AuditEvent.entity_id, AuditEvent.action)
                .where(AuditEvent.entity_type == "deletion_request").order_by(AuditEvent.seq)):
            events[entity_id].append(action)
        chain = audit.verify_chain(db_session)
    lost = {key: request_id for key, request_id in acknowledged.items()
            if stored.get(key) != request_id}
    assert not lost, f"acknowledged but not stored as acknowledged: {sorted(lost.items())[:10]}"
    for request_id in acknowledged.values():
        assert events[request_id][:1] == ["deletion_request.received"], events[request_id]
        assert events[request_id].count("deletion_request.received") == 1
    assert chain.ok, chain
    return len(stored)
