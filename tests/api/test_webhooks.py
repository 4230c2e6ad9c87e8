"""Webhooks: each state change of a client's request is POSTed, HMAC-signed, to its endpoint;
a failing endpoint is retried with growing backoff and every attempt is logged. An endpoint on
the service's own network (loopback, link-local, private, ...) is refused, at registration and
again at each delivery; deleting a webhook cancels what it had not yet been sent."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.webhooks import service as webhooks
from app.webhooks.models import Webhook, WebhookDelivery
from tests.api.conftest import KeyFactory
from tests.api.seed import seed_model
from tests.conftest import app_of
from worker import context, tasks

PUBLIC_ADDRESS = "93.184.215.14"


class Receiver:
    """A real HTTP endpoint that fails the first ``failures`` deliveries."""

    def __init__(self, failures: int, address: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.server_names: list[str | None] = []  # TLS: the names clients asked for (SNI)
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

        self.server = HTTPServer((address, port), Handler)
        if tls is not None:
            tls.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://{address}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver(failures=1)
    yield endpoint
    endpoint.server.shutdown()


@pytest.fixture
def worker_on(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point the worker process context at the test's database."""
    settings: Settings = app_of(client).state.settings
    monkeypatch.setattr(context, "_context", None)
    monkeypatch.setattr(context, "get_settings", lambda: settings)
    return settings


@pytest.fixture
def loopback_allowed(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator allows the loopback network, where the test endpoints listen."""
    monkeypatch.setattr(app_of(client).state.settings,
                        "webhook_allowed_networks", "127.0.0.0/8")


class FakeDNS:
    """``socket.getaddrinfo`` answering the names it is given (each lookup takes the next
    answer, the last one repeating), and the real resolver for any other name."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.real = socket.getaddrinfo

    def set(self, host: str, *answers: list[str]) -> None:
        self.answers[host] = list(answers)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in self.answers:
            return self.real(host, port, *args, **kwargs)
        queue = self.answers[host]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def deliveries(client: TestClient) -> list[WebhookDelivery]:
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        return list(db_session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_state_changes_are_posted_signed_and_retried_with_backoff(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, loopback_allowed: None, tmp_path: Path
) -> None:
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

    with session_scope(app_of(client).state.sessionmaker) as db_session:
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
        worker_on: Settings, loopback_allowed: None) -> None:
    seed_model(client, operator)
    assert client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/unreachable"},
                       headers=requester).status_code == 201
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    from app.webhooks.service import MAX_ATTEMPTS

    for _ in range(MAX_ATTEMPTS):
        with session_scope(app_of(client).state.sessionmaker) as db_session:
            db_session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
        tasks.deliver_webhooks()
    (delivery,) = deliveries(client)
    assert delivery.status == "failed" and delivery.attempts == MAX_ATTEMPTS
    assert "ConnectError" in (delivery.last_error or "")


def test_webhooks_belong_to_their_client(client: TestClient, make_key: KeyFactory,
                                         dns: FakeDNS) -> None:
    dns.set("a.example", [PUBLIC_ADDRESS])
    mine, theirs = make_key("requester", "client-a"), make_key("requester", "client-b")
    hook = client.post("/v1/webhooks", json={"url": "https://a.example/hook"},
                       headers=mine).json()
    assert client.get("/v1/webhooks", headers=theirs).json() == []
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=theirs).status_code == 404
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=mine).status_code == 204
    assert client.post("/v1/webhooks", json={"url": "not a url"},
                       headers=mine).status_code == 422


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:8080/hook", "resolves to 127.0.0.1, a loopback address"),
    ("http://localhost/hook", "a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "resolves to 169.254.169.254, a link-local"),
    ("http://10.1.2.3/hook", "resolves to 10.1.2.3, a private address"),
    ("https://[fd12:3456::1]/hook", "resolves to fd12:3456::1, a private address"),
    ("http://[::1]/hook", "resolves to ::1, a loopback address"),
    ("http://[::ffff:127.0.0.1]/hook", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("http://224.0.0.1/hook", "resolves to 224.0.0.1, a multicast address"),
    ("http://0.0.0.0/hook", "an unspecified address"),
    # One public address does not excuse another that is not.
    ("https://mixed.example/hook", "resolves to 10.0.0.5, a private address"),
])
def test_a_url_that_reaches_the_services_own_network_is_refused_and_not_stored(
        client: TestClient, requester: dict[str, str], dns: FakeDNS, url: str, reason: str
) -> None:
    dns.set("mixed.example", [PUBLIC_ADDRESS, "10.0.0.5"])
    answer = client.post("/v1/webhooks", json={"url": url}, headers=requester)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert reason in problem["detail"]
    assert "LETHE_WEBHOOK_ALLOWED_NETWORKS" in problem["detail"]
    assert [error["loc"] for error in problem["errors"]] == [["body", "url"]]
    assert client.get("/v1/webhooks", headers=requester).json() == []


def test_a_host_that_does_not_resolve_is_refused(client: TestClient,
                                                 requester: dict[str, str]) -> None:
    answer = client.post("/v1/webhooks", json={"url": "https://hooks.invalid/lethe"},
                         headers=requester)
    assert answer.status_code == 422
    assert "host 'hooks.invalid' does not resolve" in answer.json()["detail"]
    assert client.get("/v1/webhooks", headers=requester).json() == []


def test_a_url_longer_than_its_column_is_refused_naming_the_field(
        client: TestClient, requester: dict[str, str], dns: FakeDNS) -> None:
    dns.set("a.example", [PUBLIC_ADDRESS])
    longest = "https://a.example/" + "x" * (2048 - len("https://a.example/"))
    assert client.post("/v1/webhooks", json={"url": longest},
                       headers=requester).status_code == 201
    answer = client.post("/v1/webhooks", json={"url": longest + "x"}, headers=requester)
    assert answer.status_code == 422
    assert [(e["loc"], e["type"]) for e in answer.json()["errors"]] == [
        (["body", "url"], "too_long")]


def test_a_network_the_operator_allows_may_be_a_target(
        client: TestClient, requester: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_of(client).state.settings,
                        "webhook_allowed_networks", "10.20.0.0/16, fd00:1::/48")
    for url in ("http://10.20.3.4/hook", "http://[fd00:1::7]/hook"):
        assert client.post("/v1/webhooks", json={"url": url},
                           headers=requester).status_code == 201
    for url in ("http://10.21.0.1/hook", "http://127.0.0.1/hook"):
        assert client.post("/v1/webhooks", json={"url": url},
                           headers=requester).status_code == 422


def test_the_allowed_networks_setting_reads_cidrs_and_refuses_a_typo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8, fd00::/8,192.168.1.7")
    assert [str(n) for n in Settings().webhook_allowed_network_list] == [
        "10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
    assert Settings(webhook_allowed_networks="").webhook_allowed_network_list == []
    with pytest.raises(ValidationError, match="webhook_allowed_networks"):
        Settings(webhook_allowed_networks="10.0.0.0/8,intranet")


def test_a_host_that_resolves_elsewhere_at_delivery_is_refused_then_not_posted(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, dns: FakeDNS) -> None:
    """DNS rebinding: public when registered, the service's own network when sent."""
    seed_model(client, operator)
    dns.set("hooks.example", [PUBLIC_ADDRESS])
    assert client.post("/v1/webhooks", json={"url": f"http://hooks.example:{receiver.port}/h"},
                       headers=requester).status_code == 201
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    dns.set("hooks.example", ["127.0.0.1"])

    assert tasks.deliver_webhooks() == 1
    assert receiver.received == []
    (delivery,) = deliveries(client)
    # A policy refusal: retrying would only be refused again, so it fails at once.
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error == "refused: resolves to 127.0.0.1, a loopback address"
    assert tasks.deliver_webhooks() == 0


def test_a_delivery_connects_to_the_address_it_checked_not_to_a_later_answer(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        worker_on: Settings, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 127.0.0.1 is allowed; were the name resolved again to connect, the next answer
    (127.0.0.2, where another service listens) would be reached unchecked."""
    monkeypatch.setattr(worker_on, "webhook_allowed_networks", "127.0.0.1/32")
    allowed = Receiver(failures=0)
    internal = Receiver(failures=0, address="127.0.0.2", port=allowed.port)
    try:
        seed_model(client, operator)
        dns.set("hooks.example", ["127.0.0.1"])
        url = f"http://hooks.example:{allowed.port}/h"
        assert client.post("/v1/webhooks", json={"url": url},
                           headers=requester).status_code == 201
        client.post("/v1/deletion-requests", headers=requester,
                    json={"kind": "subject", "subject_ref": "customer-1"})
        dns.set("hooks.example", ["127.0.0.1"], ["127.0.0.2"])

        assert tasks.deliver_webhooks() == 1
        assert [d.status for d in deliveries(client)] == ["delivered"]
        assert internal.received == []
        ((headers, _),) = allowed.received
        assert headers["Host"] == f"hooks.example:{allowed.port}"
    finally:
        allowed.server.shutdown()
        internal.server.shutdown()


def self_signed_certificate(host: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for ``host`` (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    certificate_path, key_path = directory / "certificate.pem", directory / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate_path, key_path


def test_an_https_delivery_to_the_checked_address_verifies_the_registered_hosts_certificate(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        worker_on: Settings, loopback_allowed: None, dns: FakeDNS,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The connection goes to an address, yet TLS names the host (SNI) and checks the
    certificate against it, as for any https URL."""
    certificate, key = self_signed_certificate("hooks.example", tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # the worker's client trusts it
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate, key)
    endpoint = Receiver(failures=0, tls=tls)
    try:
        seed_model(client, operator)
        dns.set("hooks.example", ["127.0.0.1"])
        assert client.post("/v1/webhooks", headers=requester, json={
            "url": f"https://hooks.example:{endpoint.port}/h"}).status_code == 201
        client.post("/v1/deletion-requests", headers=requester,
                    json={"kind": "subject", "subject_ref": "customer-1"})

        assert tasks.deliver_webhooks() == 1
        assert [d.status for d in deliveries(client)] == ["delivered"]
        assert endpoint.server_names == ["hooks.example"]
        ((headers, _),) = endpoint.received
        assert headers["Host"] == f"hooks.example:{endpoint.port}"
    finally:
        endpoint.server.shutdown()


def test_deleting_a_webhook_cancels_its_pending_deliveries(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, loopback_allowed: None) -> None:
    seed_model(client, operator)
    hook = client.post("/v1/webhooks", json={"url": receiver.url}, headers=requester).json()
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    assert [d.status for d in deliveries(client)] == ["pending"]

    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=requester).status_code == 204
    assert [d.status for d in deliveries(client)] == ["canceled"]
    assert tasks.deliver_webhooks() == 0
    assert receiver.received == []


def test_a_webhook_deleted_after_its_delivery_was_leased_is_not_posted(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, loopback_allowed: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seed_model(client, operator)
    hook = client.post("/v1/webhooks", json={"url": receiver.url}, headers=requester).json()
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    lease_due = webhooks.lease_due

    def lease_then_unsubscribe(db_session: Any, **kwargs: Any) -> Any:
        leased = lease_due(db_session, **kwargs)
        assert client.delete(f"/v1/webhooks/{hook['id']}", headers=requester).status_code == 204
        return leased

    monkeypatch.setattr(webhooks, "lease_due", lease_then_unsubscribe)
    assert tasks.deliver_webhooks() == 0
    assert receiver.received == []
    (delivery,) = deliveries(client)
    assert (delivery.status, delivery.attempts) == ("canceled", 0)


def test_pending_deliveries_of_an_inactive_webhook_are_never_leased(
        client: TestClient, operator: dict[str, str], requester: dict[str, str],
        receiver: Receiver, worker_on: Settings, loopback_allowed: None) -> None:
    """Rows a deletion left pending before deletions canceled them."""
    seed_model(client, operator)
    client.post("/v1/webhooks", json={"url": receiver.url}, headers=requester)
    client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "customer-1"},
                headers=requester)
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(update(Webhook).values(active=False))
    assert tasks.deliver_webhooks() == 0
    assert receiver.received == []
    assert [d.status for d in deliveries(client)] == ["pending"]
