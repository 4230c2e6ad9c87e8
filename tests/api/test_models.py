"""Model registration, safetensors-only uploads, the alias rules, and serving."""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from safetensors.torch import save_file
from sqlalchemy import select, update

from app.core.db import session_scope, utcnow
from app.requests.models import DeletionRequest, DeletionTarget
from tests.api.seed import MLP, seed_model
from tests.conftest import app_of
from unlearning.architectures import build_model

MODEL = "digits-mlp"
OCTET = "application/octet-stream"


def weights_bytes(tmp_path: Path, spec: dict[str, Any] = MLP, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    path = tmp_path / f"w{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(spec).state_dict().items()}, str(path))
    return path.read_bytes()


def upload(client: TestClient, operator: dict[str, str], body: bytes) -> Response:
    return client.post(f"/v1/models/{MODEL}/versions", content=body,
                       headers={**operator, "Content-Type": OCTET})


@pytest.fixture
def model(client: TestClient, operator: dict[str, str]) -> str:
    seed_model(client, operator)
    return MODEL


def test_a_safetensors_upload_becomes_a_version_with_its_sha256(
        client: TestClient, operator: dict[str, str], model: str, tmp_path: Path) -> None:
    import hashlib

    body = weights_bytes(tmp_path)
    response = upload(client, operator, body)
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["number"] == 1 and version["status"] == "candidate"
    assert version["sha256"] == hashlib.sha256(body).hexdigest()
    download = client.get(f"/v1/models/{MODEL}/versions/1/weights", headers=operator)
    assert download.content == body


def rewritten(weights: bytes, change: Callable[[dict[str, Any]], object], *,
              data: bytes | None = None) -> bytes:
    """``weights`` with its safetensors header changed (and its tensor bytes, if given)."""
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    header = change(header) or header
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (weights[8 + length:] if data is None else data)


def offsets_past_the_end(header: dict[str, Any]) -> None:
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [0, 10**12]


@pytest.mark.parametrize("name", [
    "pickle", "garbage", "truncated", "wrong-shapes", "empty",
    # Found by the reliability suite: these passed the header check, became versions, and
    # made predict answer 500 once production pointed at them, or were 500s themselves.
    "tensor-bytes-missing", "tensor-bytes-cut", "offsets-past-the-end", "metadata-a-list",
    "metadata-a-number", "nested-header-bomb",
])
def test_anything_but_fitting_safetensors_is_422_and_never_loaded(
        client: TestClient, operator: dict[str, str], model: str, tmp_path: Path,
        name: str) -> None:
    class Boom:
        def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
            return (Path.touch, (tmp_path / "pwned",))

    good = weights_bytes(tmp_path)
    (header_length,) = struct.unpack("<Q", good[:8])
    bodies = {
        "pickle": pickle.dumps({"weight": Boom()}),
        "garbage": b"\x00" * 64,
        "truncated": weights_bytes(tmp_path)[:100],
        "wrong-shapes": weights_bytes(tmp_path, {"name": "mlp", "kwargs": {
            "in_channels": 1, "input_size": 8, "num_classes": 3, "hidden": 16}}),
        "empty": b"",
        "tensor-bytes-missing": good[:8 + header_length],
        "tensor-bytes-cut": good[:8 + header_length + (len(good) - 8 - header_length) // 2],
        "offsets-past-the-end": rewritten(good, offsets_past_the_end),
        "metadata-a-list": rewritten(good, lambda h: {**h, "__metadata__": [1, 2]}),
        "metadata-a-number": rewritten(good, lambda h: {**h, "__metadata__": 5}),
        "nested-header-bomb": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
    }
    response = upload(client, operator, bodies[name])
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert not (tmp_path / "pwned").exists()
    assert client.get(f"/v1/models/{MODEL}/versions", headers=operator).json() == []


def test_models_validate_dataset_architecture_and_policy(
        client: TestClient, operator: dict[str, str], model: str) -> None:
    def create(**overrides: object) -> int:
        body = {"name": "other", "architecture": MLP, "dataset": "digits", **overrides}
        return client.post("/v1/models", json=body, headers=operator).status_code

    assert create(dataset="nope") == 422
    assert create(architecture={"name": "resnet9000"}) == 422
    assert create(architecture={"name": "os:system", "kwargs": {"command": "true"}}) == 422
    assert create(policy={"method": "no-such-method"}) == 422
    assert create(policy={"method_config": {"no_such_field": 1}}) == 422
    # a value the job would trip over: refused when the policy is registered
    assert create(policy={"method": "match", "method_config": {"tolerance": None}}) == 422
    assert create(policy={"method": "match", "method_config": {"max_steps": "many"}}) == 422
    assert create(policy={"method": "match", "method_config": {"max_steps": True}}) == 422
    assert create(policy={"due_days": 0}) == 422
    assert create() == 201
    assert create() == 409


def test_production_alias_publishes_and_supersedes(
        client: TestClient, operator: dict[str, str], model: str, tmp_path: Path) -> None:
    upload(client, operator, weights_bytes(tmp_path, seed=1))
    upload(client, operator, weights_bytes(tmp_path, seed=2))
    for number in (1, 2):
        response = client.put(f"/v1/models/{MODEL}/aliases/production",
                              json={"version": number}, headers=operator)
        assert response.status_code == 200
    statuses = [v["status"] for v in client.get(f"/v1/models/{MODEL}/versions",
                                                headers=operator).json()]
    assert statuses == ["superseded", "published"]
    assert client.get(f"/v1/models/{MODEL}", headers=operator).json()["aliases"] == {
        "production": 2}


def test_no_alias_may_point_before_a_completed_erasure(
        client: TestClient, operator: dict[str, str], requester: dict[str, str], model: str,
        tmp_path: Path) -> None:
    for seed in (1, 2):
        upload(client, operator, weights_bytes(tmp_path, seed=seed))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 1}, headers=operator)
    request_id = client.post("/v1/deletion-requests", json={"kind": "subject",
                                                             "subject_ref": "customer-1"},
                             headers=requester).json()["id"]
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        # What a publish records: the erasure completed in version 2.
        from app.models_registry.models import ModelVersion

        version_id = db_session.query(ModelVersion.id).filter_by(number=2).scalar()
        db_session.execute(update(DeletionTarget).where(DeletionTarget.request_id == request_id)
                           .values(status="completed", version_id=version_id))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 2}, headers=operator)
    rollback = client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 1},
                          headers=operator)
    assert rollback.status_code == 409
    assert rollback.json()["erasure_version"] == 2
    assert client.put(f"/v1/models/{MODEL}/aliases/staging", json={"version": 1},
                      headers=operator).status_code == 409


def test_weights_holding_erased_data_are_kept_for_the_grace_period_never_past_a_deadline(
        client: TestClient, operator: dict[str, str], requester: dict[str, str], model: str,
        tmp_path: Path) -> None:
    from app.models_registry import service as registry
    from app.models_registry.models import Model, ModelVersion

    assert client.get(f"/v1/models/{MODEL}", headers=operator
                      ).json()["policy"]["grace_days"] == 7
    for seed in (1, 2):
        upload(client, operator, weights_bytes(tmp_path, seed=seed))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 1}, headers=operator)
    request_id = client.post("/v1/deletion-requests", json={"kind": "subject",
                                                             "subject_ref": "customer-1"},
                             headers=requester).json()["id"]
    factory = app_of(client).state.sessionmaker

    def purgeable(**changes: Any) -> list[int]:
        """Version numbers the purge would take, after ``changes`` (column -> value) to the
        model, version 1 or the request."""
        with session_scope(factory) as db_session:
            for table, where in ((Model, Model.name == MODEL),
                                 (ModelVersion, ModelVersion.number == 1),
                                 (DeletionRequest, DeletionRequest.id == request_id)):
                values = {k: v for k, v in changes.items() if hasattr(table, k)}
                if values:
                    db_session.execute(update(table).where(where).values(**values))
            found = registry.purgeable_versions(db_session,
                                                model=registry.get(db_session, name=MODEL))
            return [v.number for v in found]

    with session_scope(factory) as db_session:  # what a publish records: erased in version 2
        version_id = db_session.scalar(select(ModelVersion.id).where(ModelVersion.number == 2))
        db_session.execute(update(DeletionTarget).where(DeletionTarget.request_id == request_id)
                           .values(status="completed", version_id=version_id))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 2}, headers=operator)
    now = utcnow()
    assert purgeable() == []  # superseded a moment ago: kept to compare
    assert purgeable(superseded_at=now - timedelta(days=8)) == [1]  # the grace period is over
    # Within the grace period, but the request whose data version 1 holds is due: it goes.
    assert purgeable(superseded_at=now, due_at=now + timedelta(days=1)) == []
    assert purgeable(due_at=now - timedelta(minutes=1)) == [1]
    policy = client.get(f"/v1/models/{MODEL}", headers=operator).json()["policy"]
    stored = {k: v for k, v in policy.items() if k != "grace_days"}
    assert purgeable(due_at=now + timedelta(days=30), policy={**stored, "grace_days": 0}) == [1]
    # A policy stored before the field existed reads the default.
    assert purgeable(policy=stored) == []
    assert client.get(f"/v1/models/{MODEL}", headers=operator
                      ).json()["policy"]["grace_days"] == 7


def test_predict_answers_with_the_production_version_and_swaps_on_publish(
        client: TestClient, operator: dict[str, str], requester: dict[str, str], model: str,
        tmp_path: Path) -> None:
    image = [[0.5] * 8] * 8
    assert client.post(f"/v1/models/{MODEL}/predict", json={"inputs": [image]},
                       headers=requester).status_code == 409  # nothing in production yet
    for seed in (1, 2):
        upload(client, operator, weights_bytes(tmp_path, seed=seed))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 1}, headers=operator)
    first = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": [image, image]},
                        headers=requester).json()
    assert first["model_version"] == 1 and len(first["predictions"]) == 2
    assert abs(sum(first["probabilities"][0]) - 1) < 1e-4
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 2}, headers=operator)
    raw = np.full((1, 1, 8, 8), 0.5, dtype="<f4").tobytes()
    second = client.post(f"/v1/models/{MODEL}/predict", headers=requester, json={
        "inputs_b64": base64.b64encode(raw).decode(), "shape": [1, 1, 8, 8]}).json()
    assert second["model_version"] == 2


@pytest.mark.parametrize("body", [
    {"inputs": [[[0.5] * 7] * 8]},  # wrong width
    {"inputs": [[[float("nan")] * 8] * 8]},
    {"inputs": [[[1e309] * 8] * 8]},  # JSON infinity
    {"inputs": [[[0.5] * 8, [0.5] * 3]]},  # ragged
    {"inputs": [[["a"] * 8] * 8]},
    {"inputs": []},
    {"inputs_b64": "!!notbase64", "shape": [1, 1, 8, 8]},
    {"inputs_b64": base64.b64encode(b"1234").decode(), "shape": [1, 1, 8, 8]},
    {"inputs_b64": base64.b64encode(b"1234").decode()},
    {"inputs": [[[0.5] * 8] * 8], "inputs_b64": "AAAA", "shape": [1, 1, 1, 1]},
])
def test_malformed_predict_inputs_are_422(
        client: TestClient, operator: dict[str, str], requester: dict[str, str], model: str,
        tmp_path: Path, body: dict[str, Any]) -> None:
    upload(client, operator, weights_bytes(tmp_path))
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 1}, headers=operator)
    content = io.BytesIO()
    import json

    content.write(json.dumps(body).replace("Infinity", "1e309").encode())
    response = client.post(f"/v1/models/{MODEL}/predict", content=content.getvalue(),
                           headers={**requester, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_method_config_is_checked_field_by_field() -> None:
    from app.models_registry.engine_bridge import check_method_config
    from unlearning.methods import METHODS

    check_method_config("match", {"lr": 1, "max_steps": 10, "check_size": None,
                                  "statistic": "loss"})
    for bad in ({"tolerance": None}, {"max_steps": 2.5}, {"max_steps": True},
                {"lr": "0.1"}, {"statistic": 3}, {"no_such_field": 1}):
        with pytest.raises(ValueError, match="method_config"):
            check_method_config("match", bad)
    for name in METHODS:  # every method's published defaults pass their own check
        check_method_config(name, METHODS[name].Config().to_dict())
