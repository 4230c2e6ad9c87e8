"""`lethe certificate verify --public-key`: the key as GET /v1/certificates/public-key serves
it (its JSON body as saved), or the PEM or the JWK in it; anything else is a clear error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from app.cli import certificate
from tests.dashboard.conftest import World, make_world


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    # The dashboard's seeded Lethe: a completed request with the certificate it was issued.
    built = make_world(database_url, tmp_path / "data")
    yield built
    built.app.state.engine.dispose()


@pytest.fixture
def served(world: World, tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """The certificate and the public-key body, fetched over the API and saved as files."""
    request_id = world.seeded.requests["completed"]
    with TestClient(world.app) as api:
        document = api.get(f"/v1/deletion-requests/{request_id}/certificate",
                           headers={"Authorization": f"Bearer {world.seeded.keys['auditor']}"})
        public_key = api.get("/v1/certificates/public-key")
    assert document.status_code == 200 and public_key.status_code == 200
    path = tmp_path / "certificate.json"
    path.write_text(document.text)
    return path, public_key.json()


def verify(document: Path, key_text: str | bytes, tmp_path: Path) -> Result:
    key_file = tmp_path / "key"
    if isinstance(key_text, bytes):
        key_file.write_bytes(key_text)
    else:
        key_file.write_text(key_text)
    return CliRunner().invoke(certificate, ["verify", str(document),
                                            "--public-key", str(key_file)])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_key_is_read_as_served_as_pem_or_as_jwk(
        served: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    document, body = served
    for form in (json.dumps(body), body["pem"], json.dumps(body["jwk"])):
        assert isinstance(form, str)
        result = verify(document, form, tmp_path)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("VALID: valid")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_anything_else_is_a_clear_error_not_a_traceback(
        served: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    document, body = served
    jwk = body["jwk"]
    assert isinstance(jwk, dict)
    other_curve = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for garbage in ("", "hello", "[1, 2]", "{}", json.dumps({"pem": 5}),
                    json.dumps({**body, "key_id": "0" * 16}), json.dumps({"kty": "RSA"}),
                    json.dumps({**jwk, "x": "not base64!"}), json.dumps({**jwk, "x": "AAAA"}),
                    "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
                    other_curve, b"\xff\xfe\x00garbage"):
        result = verify(document, garbage, tmp_path)
        assert result.exit_code == 1, (garbage, result.output)
        assert type(result.exception) is SystemExit, (garbage, result.exception)
        assert result.output.startswith("Error: --public-key"), (garbage, result.output)
