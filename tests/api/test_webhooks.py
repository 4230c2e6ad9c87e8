"""Webhooks: each state change of a client's request is POSTed, HMAC-signed, to its endpoint;
a failing endpoint is retried with growing backoff and every attempt is logged."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.webhooks.models import WebhookDelivery
from tests.api.seed import seed_model
from worker import context, tasks


class Receiver:
    """A real HTTP endpoint that fails the first ``failures`` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                failing = receiver.failures > 0
                receiver.failures -= 1
                self.send_response(503 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver(failures=1)
    yield endpoint
    endpoint.server.shutdown()


@pytest.fixture
def worker_on(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point the worker process context at the test's database."""
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    monkeypatch.setattr(context, "_context", None)
    monkeypatch.setattr(context, "get_settings", lambda: settings)
    return settings


def deliveries(client: TestClient) -> list[WebhookDelivery]:
    with session_scope(client.app.state.sessionmaker) as db_session:  # type: ignore[attr-defined]
        return list(db_session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_state_changes_are_posted_signed_and_retried_with_backoff(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, tmp_path: Path) -> None:
    seed_model(client, operator)
    created = client.post("/v1/webhooks", json={"url": receiver.url}, headers=requester)
    assert created.status_code == 201
    secret = created.json()["secret"].encode()
    request_id = client.post("/v1/deletion-requests", json={
        "kind": "subject", "subject_ref": "customer-1"}, headers=requester).json()["id"]
    client.post(f"/v1/deletion-requests/{request_id}/cancel", headers=requester)
    # received -> queued, queued -> canceled: one delivery per transition, in the outbox.
    assert [d.event for d in deliveries(client)] == [
        "deletion_request.queued", "deletion_request.canceled"]

    assert tasks.deliver_webhooks() == 2
    first, second = deliveries(client)
    assert (first.status, first.attempts, first.last_status_code) == ("pending", 1, 503)
    assert first.next_attempt_at > utcnow()  # backing off
    assert (second.status, second.last_status_code) == ("delivered", 204)

    with session_scope(client.app.state.sessionmaker) as db_session:  # type: ignore[attr-defined]
        db_session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
    assert tasks.deliver_webhooks() == 1
    assert [d.status for d in deliveries(client)] == ["delivered", "delivered"]

    headers, body = receiver.received[-1]
    timestamp, digest = (part.split("=", 1)[1] for part in
                         headers["Lethe-Signature"].split(","))
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(digest, expected)
    payload = json.loads(body)
    assert payload["event"] == "deletion_request.queued"
    assert payload["data"]["id"] == request_id


def test_an_endpoint_that_never_answers_is_given_up_after_the_last_retry(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        worker_on: Settings) -> None:
    seed_model(client, operator)
    client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/unreachable"},
                headers=requester)
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    from app.webhooks.service import MAX_ATTEMPTS

    for _ in range(MAX_ATTEMPTS):
        with session_scope(client.app.state.sessionmaker) as db_session:  # type: ignore[attr-defined]
            db_session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        tasks.deliver_webhooks()
    (delivery,) = deliveries(client)
    assert delivery.status == "failed" and delivery.attempts == MAX_ATTEMPTS
    assert "ConnectError" in (delivery.last_error or "")


def test_webhooks_belong_to_their_client(client: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = make_key("requester", "client-a"), make_key("requester", "client-b")
    hook = client.post("/v1/webhooks", json={"url": "https://a.example/hook"},
                       headers=mine).json()
    assert client.get("/v1/webhooks", headers=theirs).json() == []
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=theirs).status_code == 404
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=mine).status_code == 204
    assert client.post("/v1/webhooks", json={"url": "not a url"},
                       headers=mine).status_code == 422
