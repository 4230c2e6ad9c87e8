"""Deletion requests over HTTP: intake, idempotency, visibility, lifecycle, queries, export."""

from __future__ import annotations

import base64
import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select, update

from app.core.db import session_scope, utcnow
from app.requests.models import DeletionRequest, DeletionTarget
from tests.api.conftest import KeyFactory
from tests.api.seed import seed_model
from tests.conftest import app_of

URL = "/v1/deletion-requests"


@pytest.fixture
def seeded(client: TestClient, operator: dict[str, str]) -> None:
    seed_model(client, operator)


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any],
           key: str | None = None) -> Response:
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(URL, json=body, headers={**headers, **extra})


def test_subject_request_is_queued_with_a_location_and_a_30_day_deadline(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    response = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"{URL}/{body['id']}"
    assert body["status"] == "queued"
    assert [t["model"] for t in body["targets"]] == ["digits-mlp"]
    assert body["targets"][0]["sample_count"] == 4
    assert body["days_left"] == 30 and body["overdue"] is False
    assert "customer-1" not in response.text  # the raw subject reference is never echoed


def test_subject_with_nothing_held_is_closed_at_once_as_no_data(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    body = submit(client, requester, {"kind": "subject", "subject_ref": "stranger"}).json()
    assert body["status"] == "rejected" and body["outcome"] == "no_data"
    assert body["targets"] == []


def test_sample_request_reports_keys_it_could_not_find(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    body = submit(client, requester, {"kind": "samples",
                                      "sample_keys": ["s-00001", "s-00002", "nope"]}).json()
    assert body["status"] == "queued"
    assert body["targets"][0]["sample_count"] == 2
    assert body["payload"]["missing_sample_keys"] == ["nope"]


def test_class_request_needs_an_existing_model(
        client: TestClient, operator: dict[str, str], seeded: None) -> None:
    ok = submit(client, operator, {"kind": "class", "class_label": 3, "model": "digits-mlp"})
    assert ok.json()["targets"][0]["scenario"] == "class:3"
    missing = submit(client, operator, {"kind": "class", "class_label": 3, "model": "nope"})
    assert missing.status_code == 422
    assert missing.headers["content-type"] == "application/problem+json"


SCENARIO_REQUESTS = [
    {"kind": "class", "class_label": 3, "model": "digits-mlp"},
    {"kind": "backdoor", "sample_keys": ["s-00001"], "model": "digits-mlp"},
    {"kind": "backdoor", "sample_keys": ["s-00001"]},  # reaches the model holding the sample
]


@pytest.mark.parametrize("body", SCENARIO_REQUESTS, ids=["class", "backdoor", "backdoor-any"])
def test_class_and_backdoor_requests_need_an_operator_or_a_policy_naming_the_client(
        client: TestClient, requester: dict[str, str], operator: dict[str, str],
        seeded: None, body: dict[str, Any]) -> None:
    refused = submit(client, requester, body)
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["rule"] == "scenario_clients" and problem["model"] == "digits-mlp"
    assert "operator key" in problem["detail"] and "'acme'" in problem["detail"]
    bulk = client.post(f"{URL}:bulk", json={"requests": [
        {"kind": "subject", "subject_ref": "customer-1"}, body]}, headers=requester).json()
    assert len(bulk["succeeded"]) == 1
    assert [(f["index"], f["status"]) for f in bulk["failed"]] == [(1, 403)]
    assert "scenario_clients" in bulk["failed"][0]["detail"]
    assert client.get(URL, params={"kind": body["kind"]}, headers=requester
                      ).json()["items"] == []  # nothing was recorded

    assert submit(client, operator, body).json()["status"] == "queued"
    model = client.get("/v1/models/digits-mlp", headers=operator).json()
    response = client.put("/v1/models/digits-mlp/policy", json={"policy": {
        **model["policy"], "scenario_clients": ["acme"]}}, headers=operator)
    assert response.status_code == 200, response.text
    assert submit(client, requester, body).json()["status"] == "queued"


def test_same_idempotency_key_and_body_returns_the_same_request(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    body = {"kind": "subject", "subject_ref": "customer-2"}
    first = submit(client, requester, body, key="k-1")
    second = submit(client, requester, body, key="k-1")
    assert second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"


def test_same_idempotency_key_with_another_body_is_a_conflict(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    submit(client, requester, {"kind": "subject", "subject_ref": "customer-2"}, key="k-2")
    other = submit(client, requester, {"kind": "subject", "subject_ref": "customer-3"},
                   key="k-2")
    assert other.status_code == 409
    assert other.json()["type"] == "urn:lethe:problem:conflict"


def test_idempotency_keys_are_scoped_per_client(
        client: TestClient, make_key: KeyFactory, seeded: None) -> None:
    body = {"kind": "subject", "subject_ref": "customer-2"}
    a = submit(client, make_key("requester", "client-a"), body, key="shared")
    b = submit(client, make_key("requester", "client-b"), body, key="shared")
    assert a.json()["id"] != b.json()["id"]


def test_fifty_concurrent_posts_with_one_key_make_exactly_one_request(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    body = {"kind": "subject", "subject_ref": "customer-4"}
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: submit(client, requester, body, key="burst"),
                                  range(50)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        stored = db_session.scalars(select(DeletionRequest).where(
            DeletionRequest.idempotency_key == "burst")).all()
    assert len(stored) == 1


def test_a_requester_cannot_see_or_cancel_another_clients_request(
        client: TestClient, make_key: KeyFactory, seeded: None) -> None:
    mine = make_key("requester", "client-a")
    theirs = make_key("requester", "client-b")
    request_id = submit(client, mine, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    assert client.get(f"{URL}/{request_id}", headers=theirs).status_code == 404
    assert client.post(f"{URL}/{request_id}/cancel", headers=theirs).status_code == 404
    assert client.get(URL, headers=theirs).json()["items"] == []
    # ...even when it asks for the other client explicitly.
    assert client.get(URL, params={"client": "client-a"}, headers=theirs).json()["items"] == []
    assert client.get(f"{URL}/{request_id}", headers=mine).status_code == 200


def test_operators_and_auditors_see_every_client(
        client: TestClient, make_key: KeyFactory, operator: dict[str, str],
        auditor: dict[str, str], seeded: None) -> None:
    submit(client, make_key("requester", "client-a"),
           {"kind": "subject", "subject_ref": "customer-1"})
    submit(client, make_key("requester", "client-b"),
           {"kind": "subject", "subject_ref": "customer-2"})
    for headers in (operator, auditor):
        items = client.get(URL, headers=headers).json()["items"]
        assert {i["client_id"] for i in items} == {"client-a", "client-b"}
    only_b = client.get(URL, params={"client": "client-b"}, headers=auditor).json()["items"]
    assert [i["client_id"] for i in only_b] == ["client-b"]


def test_cancel_before_processing_then_cancel_again_is_a_conflict(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    request_id = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    canceled = client.post(f"{URL}/{request_id}/cancel", headers=requester)
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["targets"][0]["status"] == "canceled"
    again = client.post(f"{URL}/{request_id}/cancel", headers=requester)
    assert again.status_code == 409


def test_cancel_after_processing_started_is_a_conflict(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    request_id = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(update(DeletionTarget).values(status="processing"))
        db_session.execute(update(DeletionRequest).values(status="processing"))
    response = client.post(f"{URL}/{request_id}/cancel", headers=requester)
    assert response.status_code == 409
    assert response.json()["current_status"] == "processing"


def test_approval_policy_holds_requests_until_an_operator_approves(
        client: TestClient, operator: dict[str, str], requester: dict[str, str]) -> None:
    seed_model(client, operator, policy={"require_approval": True})
    request_id = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    assert client.get(f"{URL}/{request_id}", headers=requester).json()["status"] == \
        "awaiting_approval"
    assert client.post(f"{URL}/{request_id}/approve", headers=requester).status_code == 403
    approved = client.post(f"{URL}/{request_id}/approve", headers=operator)
    assert approved.json()["status"] == "queued"
    assert client.post(f"{URL}/{request_id}/approve", headers=operator).status_code == 409


def test_denied_requests_are_rejected_with_the_reason(
        client: TestClient, operator: dict[str, str], requester: dict[str, str]) -> None:
    seed_model(client, operator, policy={"require_approval": True})
    request_id = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    denied = client.post(f"{URL}/{request_id}/deny", json={"reason": "legal hold"},
                         headers=operator).json()
    assert (denied["status"], denied["outcome"], denied["reason"]) == (
        "rejected", "denied", "legal hold")


def test_retry_requeues_failed_targets_only(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        seeded: None) -> None:
    request_id = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                        ).json()["id"]
    assert client.post(f"{URL}/{request_id}/retry", headers=operator).status_code == 409
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(update(DeletionTarget).values(status="failed",
                                                         failure_reason="gate failed"))
        db_session.execute(update(DeletionRequest).values(status="failed", outcome="failed"))
    retried = client.post(f"{URL}/{request_id}/retry", headers=operator).json()
    assert retried["status"] == "queued"
    assert retried["targets"][0]["failure_reason"] is None


def test_list_filters_sorts_and_paginates_with_a_cursor(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    ids = [submit(client, requester, {"kind": "subject", "subject_ref": f"customer-{i % 5}"},
                  key=f"p{i}").json()["id"] for i in range(7)]
    seen, cursor = [], None
    while True:
        params = {"limit": 3, "sort": "received_at"} | ({"cursor": cursor} if cursor else {})
        page = client.get(URL, params=params, headers=requester).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    newest_first = client.get(URL, headers=requester).json()["items"]
    assert [i["id"] for i in newest_first] == ids[::-1]
    queued = client.get(URL, params={"status": "queued", "model": "digits-mlp"},
                        headers=requester).json()["items"]
    assert len(queued) == 7
    assert client.get(URL, params={"status": "completed"}, headers=requester
                      ).json()["items"] == []
    assert client.get(URL, params={"cursor": "not-a-cursor"}, headers=requester
                      ).status_code == 400


def test_received_times_without_a_zone_are_read_as_utc(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    created = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}).json()
    received = datetime.fromisoformat(created["received_at"])
    minute = timedelta(minutes=1)

    def found(**params: str) -> list[str]:
        response = client.get(URL, params=params, headers=requester)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    naive_before = (received - minute).replace(tzinfo=None).isoformat()
    naive_after = (received + minute).replace(tzinfo=None).isoformat()
    assert found(received_after=naive_before) == [created["id"]]
    assert found(received_after=naive_after) == []
    assert found(received_before=naive_after) == [created["id"]]
    assert found(received_before=received.date().isoformat()) == []  # midnight UTC
    assert found(received_after="2030-01-01") == []
    # With a zone, converted: the same instant two hours east.
    east = (received - minute).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert found(received_after=east) == [created["id"]]
    for bad in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "yesterday"):
        response = client.get(URL, params={"received_before": bad}, headers=requester)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["loc"] == ["query", "received_before"]


def test_a_cursor_that_is_not_one_we_made_is_400(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    def cursor(*parts: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")

    for forged in (cursor("2030-01-01T00:00:00", "x"),  # no time zone
                   cursor("2030-01-01T00:00:00+00:00", 7), cursor("garbage", "x"),
                   cursor("2030-01-01T00:00:00+00:00"), cursor(None, "x"), "not-a-cursor"):
        response = client.get(URL, params={"cursor": forged}, headers=requester)
        assert response.status_code == 400, (forged, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    ours = cursor("2030-01-01T00:00:00+02:00", "x")
    assert client.get(URL, params={"cursor": ours}, headers=requester).status_code == 200


def test_overdue_requests_are_flagged_and_filterable(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    late = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}
                  ).json()["id"]
    submit(client, requester, {"kind": "subject", "subject_ref": "customer-2"})
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(update(DeletionRequest).where(DeletionRequest.id == late)
                           .values(due_at=utcnow() - timedelta(days=2)))
    overdue = client.get(URL, params={"overdue": True}, headers=requester).json()["items"]
    assert [i["id"] for i in overdue] == [late]
    assert overdue[0]["overdue"] is True and overdue[0]["days_left"] == -2
    assert len(client.get(URL, params={"overdue": False}, headers=requester
                          ).json()["items"]) == 1


def test_csv_export_streams_every_matching_request(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    for i in range(3):
        submit(client, requester, {"kind": "subject", "subject_ref": f"customer-{i}"})
    response = client.get(URL, params={"limit": 1}, headers={**requester,
                                                              "Accept": "text/csv"})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 3  # every match, not one page
    assert {r["status"] for r in rows} == {"queued"} and rows[0]["models"] == "digits-mlp"


def test_bulk_records_each_item_on_its_own(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    response = client.post(f"{URL}:bulk", json={"requests": [
        {"kind": "subject", "subject_ref": "customer-1"},
        {"kind": "class", "class_label": 1, "model": "no-such-model"},
        {"kind": "samples", "sample_keys": ["s-00003"]},
    ]}, headers=requester)
    assert response.status_code == 200
    result = response.json()
    assert len(result["succeeded"]) == 2
    assert [(f["index"], f["status"]) for f in result["failed"]] == [(1, 422)]


def test_bulk_answers_an_item_postgresql_cannot_store_as_that_items_422(
        client: TestClient, requester: dict[str, str], seeded: None,
        database_url: str) -> None:
    response = client.post(f"{URL}:bulk", json={"requests": [
        {"kind": "subject", "subject_ref": "customer-1"},
        {"kind": "samples", "sample_keys": ["s-00003\x00"]},
        {"kind": "samples", "sample_keys": ["s-00003"]},
    ]}, headers=requester)
    assert response.status_code == 200, response.text
    result = response.json()
    if database_url.startswith("postgresql"):  # no NUL in its text: the item alone fails
        assert len(result["succeeded"]) == 2
        assert [(f["index"], f["status"]) for f in result["failed"]] == [(1, 422)]
        assert "NUL" in result["failed"][0]["detail"]
    else:  # SQLite stores NUL like any other character
        assert len(result["succeeded"]) == 3 and result["failed"] == []


def test_bulk_is_limited_to_100_requests(
        client: TestClient, requester: dict[str, str], seeded: None) -> None:
    body = {"requests": [{"kind": "subject", "subject_ref": f"c-{i}"} for i in range(101)]}
    response = client.post(f"{URL}:bulk", json=body, headers=requester)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


def test_every_transition_is_audited_and_the_row_timestamps_match(
        client: TestClient, requester: dict[str, str], auditor: dict[str, str],
        seeded: None) -> None:
    request = submit(client, requester, {"kind": "subject", "subject_ref": "customer-1"}).json()
    client.post(f"{URL}/{request['id']}/cancel", headers=requester)
    events = client.get("/v1/audit", params={"entity_id": request["id"]},
                        headers=auditor).json()["items"]
    assert [e["action"] for e in events] == ["deletion_request.received",
                                             "deletion_request.queued",
                                             "deletion_request.canceled"]
    stored = client.get(f"{URL}/{request['id']}", headers=requester).json()
    assert stored["queued_at"] is not None and stored["canceled_at"] is not None
