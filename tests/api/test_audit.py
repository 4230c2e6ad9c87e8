"""The audit log is hash-chained: tampering with any row is caught and located."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import delete, text

from app.audit.models import AuditEvent
from app.core.db import session_scope
from tests.conftest import app_of


def make_events(client: TestClient, operator: dict[str, str], n: int = 4) -> None:
    for i in range(n):
        assert client.post("/v1/datasets", json={"name": f"d{i}"},
                           headers=operator).status_code == 201


def test_an_untouched_chain_verifies(client: TestClient, operator: dict[str, str],
                                     auditor: dict[str, str]) -> None:
    make_events(client, operator)
    result = client.get("/v1/audit/verify", headers=auditor).json()
    assert result["ok"] is True
    # two key creations (fixtures) + four datasets
    assert result["checked"] == 6
    events = client.get("/v1/audit", headers=auditor).json()["items"]
    assert [e["seq"] for e in events] == list(range(1, 7))
    assert all(e["prev_hash"] == p["hash"] for p, e in zip(events, events[1:], strict=False))


def test_tampering_with_one_row_is_caught_at_that_row(
        client: TestClient, operator: dict[str, str], auditor: dict[str, str]) -> None:
    make_events(client, operator)
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(text("UPDATE audit_events SET actor = 'key:someone-else' "
                                "WHERE seq = 4"))
    result = client.get("/v1/audit/verify", headers=auditor).json()
    assert result["ok"] is False
    assert result["first_broken"]["seq"] == 4
    assert "altered" in result["first_broken"]["reason"]


def test_a_deleted_row_is_caught_as_a_gap(client: TestClient, operator: dict[str, str],
                                          auditor: dict[str, str]) -> None:
    make_events(client, operator)
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    result = client.get("/v1/audit/verify", headers=auditor).json()
    assert result["ok"] is False and result["first_broken"]["seq"] == 3


def test_the_log_pages_with_a_cursor(client: TestClient, operator: dict[str, str],
                                     auditor: dict[str, str]) -> None:
    make_events(client, operator, n=5)
    first = client.get("/v1/audit", params={"limit": 4}, headers=auditor).json()
    second = client.get("/v1/audit", params={"after": first["next_cursor"]},
                        headers=auditor).json()
    assert [e["seq"] for e in first["items"] + second["items"]] == list(range(1, 8))
    assert second["next_cursor"] is None
