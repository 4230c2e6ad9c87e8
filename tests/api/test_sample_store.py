"""Bring your own data, checked at the door: shard uploads, manifests checked against the
store, and models checked against the dataset at registration (issue: bad input accepted at
upload used to fail later, inside a job)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.core.config import Settings
from tests.api.seed import MLP, jsonl, serve_version, shard_bytes, upload_shards
from tests.conftest import app_of

NDJSON = {"Content-Type": "application/x-ndjson"}
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url,
                    secret_key="test-secret", broker_url="memory://",
                    max_upload_bytes=1 << 20, max_model_parameters=5_000_000)


@pytest.fixture
def digits(client: TestClient, operator: dict[str, str]) -> str:
    assert client.post("/v1/datasets", json={"name": "digits"},
                       headers=operator).status_code == 201
    return "digits"


def store_of(client: TestClient, dataset: str) -> Path:
    return app_of(client).state.settings.resolved_dataset_dir / dataset


def shard(n: int = 6, shape: tuple[int, ...] = (1, 8, 8), labels: list[int] | None = None,
          keys: list[str] | None = None) -> bytes:
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator())
    y = torch.tensor(labels if labels is not None else [i % 10 for i in range(n)])
    return shard_bytes(x, y, keys if keys is not None else [f"k-{i}" for i in range(n)])


def put(client: TestClient, operator: dict[str, str], path: str, body: bytes,
        dataset: str = "digits") -> Any:
    return client.put(f"/v1/datasets/{dataset}/shards/{path}", content=body,
                      headers={**operator, **OCTETS})


def rows(n: int, shard_name: str = "a.safetensors", labels: list[int] | None = None,
         split: str = "train") -> list[dict[str, Any]]:
    return [{"sample_key": f"{shard_name}-{i}", "subject_ref": f"p-{i // 2}",
             "label": labels[i] if labels else i % 10, "split": split,
             "locator": f"{shard_name}#{i}"} for i in range(n)]


def manifest(client: TestClient, operator: dict[str, str], body: list[dict[str, Any]]) -> Any:
    return client.post("/v1/datasets/digits/samples", content=jsonl(body),
                       headers={**operator, **NDJSON})


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


# ---- shard uploads -------------------------------------------------------------------------


def test_a_shard_upload_lands_whole_in_the_store_and_says_what_it_holds(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    response = put(client, operator, "train/part-0.safetensors", shard(6))
    assert response.status_code == 201, response.text
    assert response.json() == {"path": "train/part-0.safetensors", "rows": 6,
                               "sample_shape": [1, 8, 8],
                               "labels": {str(i): 1 for i in range(6)}}
    store = store_of(client, digits)
    assert [p.name for p in (store / "train").iterdir()] == ["part-0.safetensors"]
    # shards are immutable: a second upload under the same name would rewrite rows that
    # samples (forgotten ones included) point at
    again = problem(put(client, operator, "train/part-0.safetensors", shard(3)), 409)
    assert "already exists" in again["detail"]


@pytest.mark.parametrize(("path", "body", "words"), [
    ("%2E%2E/escape.safetensors", None, "relative path"),
    ("C:x.safetensors", None, "relative path"),
    ("notes.txt", None, "must end in"),
    ("p.safetensors", pickle.dumps({"x": [1, 2, 3]}), "not a sample shard"),
    ("p.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00[[[[]]]]", "not a JSON object"),
    ("p.safetensors", save({"x": torch.zeros(2, 1, 8, 8), "y": torch.zeros(2, dtype=torch.int64)},
                           metadata={"keys": '["a", "b"]'}), "uint8"),
    ("p.safetensors", save({"x": torch.zeros(2, 8, 8, dtype=torch.uint8),
                            "y": torch.zeros(2, dtype=torch.int64)},
                           metadata={"keys": '["a", "b"]'}), "[N, C, H, W]"),
    ("p.safetensors", save({"x": torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                            "y": torch.zeros(3, dtype=torch.int64)},
                           metadata={"keys": '["a", "b"]'}), "`y` must be int64 shaped [2]"),
    ("p.safetensors", shard(2, keys=["a", "a"]), "distinct"),
    ("p.safetensors", save({"x": torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                            "y": torch.zeros(2, dtype=torch.int64)}), "distinct"),
    ("p.safetensors", shard(2, labels=[0, -1]), "label -1"),
])
def test_a_malformed_shard_is_refused_and_leaves_nothing_behind(
        client: TestClient, operator: dict[str, str], digits: str, path: str,
        body: bytes | None, words: str) -> None:
    body = body if body is not None else shard(2)
    detail = problem(put(client, operator, path, body), 422)["detail"]
    assert words in detail, detail
    store = store_of(client, digits)
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


def test_a_shard_past_the_upload_limit_is_413_and_leaves_nothing_behind(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    big = shard(20_000)  # 1.25 MiB of pixels, over the fixture's 1 MiB
    assert problem(put(client, operator, "big.safetensors", big), 413)
    store = store_of(client, digits)
    assert not any(p.is_file() for p in store.rglob("*"))


def test_a_shard_must_have_the_dataset_shape_and_its_models_classes(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    upload_shards(client, operator, digits, rows(6))
    assert manifest(client, operator, rows(6)).status_code == 201
    detail = problem(put(client, operator, "wide.safetensors", shard(2, shape=(3, 8, 8))),
                     422)
    assert "shaped [3, 8, 8]" in detail["detail"] and "[1, 8, 8]" in detail["detail"]
    three = {**MLP, "kwargs": {**MLP["kwargs"], "num_classes": 10}}
    assert client.post("/v1/models", json={"name": "m", "architecture": three,
                                           "dataset": digits}, headers=operator).status_code == 201
    detail = problem(put(client, operator, "b.safetensors", shard(2, labels=[3, 12])), 422)
    assert "label 12" in detail["detail"] and "'m'" in detail["detail"]


# ---- manifests checked against the store ---------------------------------------------------


@pytest.mark.parametrize(("change", "words"), [
    ({"locator": "missing.safetensors#0"}, "no shard at 'missing.safetensors'"),
    ({"locator": "a.safetensors#6"}, "row 6 is out of range (the shard holds 6 rows)"),
    ({"label": 7}, "label 7 differs from the label the shard holds"),
    ({"locator": "images/none.png"}, "no image at"),
])
def test_a_manifest_row_the_store_contradicts_is_refused_naming_its_line(
        client: TestClient, operator: dict[str, str], digits: str, change: dict[str, Any],
        words: str) -> None:
    upload_shards(client, operator, digits, rows(6))
    body = rows(6)
    body[4] = {**body[4], **change}
    detail = problem(manifest(client, operator, body), 422)
    assert detail["line"] == 5 and words in detail["detail"], detail
    counts = client.get("/v1/datasets/digits", headers=operator).json()["samples"]
    assert counts["train"] == 0  # nothing stored


def test_a_manifest_must_keep_one_sample_shape(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    # two shards of different shapes may both arrive before any sample is registered; the
    # manifest that names both is refused at the first row of the second shape
    assert put(client, operator, "a.safetensors", shard(4)).status_code == 201
    assert put(client, operator, "b.safetensors", shard(4, shape=(1, 16, 16))).status_code == 201
    body = rows(4, "a.safetensors") + rows(4, "b.safetensors")
    detail = problem(manifest(client, operator, body), 422)
    assert detail["line"] == 5 and "[1, 16, 16]" in detail["detail"]
    assert manifest(client, operator, rows(4, "a.safetensors")).status_code == 201
    # later manifests are held to the shape the registered samples have
    detail = problem(manifest(client, operator, rows(4, "b.safetensors")), 422)
    assert detail["line"] == 1 and "the dataset's samples are [1, 8, 8]" in detail["detail"]


def test_manifest_labels_must_be_classes_of_the_datasets_models(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    upload_shards(client, operator, digits, rows(6))
    assert manifest(client, operator, rows(3)).status_code == 201  # labels 0..2
    four = {**MLP, "kwargs": {**MLP["kwargs"], "num_classes": 4}}
    assert client.post("/v1/models", json={"name": "four", "architecture": four,
                                           "dataset": digits}, headers=operator).status_code == 201
    later = [dict(r, sample_key=f"later-{i}") for i, r in enumerate(rows(6))][3:]  # 3, 4, 5
    detail = problem(manifest(client, operator, later), 422)
    assert detail["line"] == 2 and "label 4 is not a class of model 'four'" in detail["detail"]


# ---- models checked against the dataset ----------------------------------------------------


def test_a_model_that_cannot_take_the_datasets_samples_is_refused_at_registration(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    upload_shards(client, operator, digits, rows(10))
    assert manifest(client, operator, rows(10)).status_code == 201

    def register(architecture: dict[str, Any]) -> Any:
        return client.post("/v1/models", json={"name": "m", "architecture": architecture,
                                               "dataset": digits}, headers=operator)

    wrong_size = {"name": "mlp", "kwargs": {"in_channels": 1, "input_size": 28}}
    assert "[1, 28, 28]" in problem(register(wrong_size), 422)["detail"]
    # a ResNet pools globally, so only a dummy batch shows that 3 channels cannot take 1
    resnet = {"name": "resnet8", "kwargs": {"in_channels": 3, "num_classes": 10}}
    assert "dummy batch shaped [2, 1, 8, 8]" in problem(register(resnet), 422)["detail"]
    few = {**MLP, "kwargs": {**MLP["kwargs"], "num_classes": 5}}
    body = problem(register(few), 422)
    assert body["classes"] == 5 and body["largest_label"] == 9
    # counted on the meta device: 784 x 10^6 weights would need 3 GiB to build for real
    huge = {"name": "mlp", "kwargs": {"input_size": 28, "hidden": 1_000_000}}
    assert "LETHE_MAX_MODEL_PARAMETERS" in problem(register(huge), 422)["detail"]
    assert register(MLP).status_code == 201


def test_predict_with_the_wrong_shape_is_422_for_an_architecture_that_pools_globally(
        client: TestClient, operator: dict[str, str], digits: str, tmp_path: Path) -> None:
    upload_shards(client, operator, digits, rows(10))
    assert manifest(client, operator, rows(10)).status_code == 201
    resnet = {"name": "resnet8", "kwargs": {"in_channels": 1, "num_classes": 10}}
    assert client.post("/v1/models", json={"name": "r", "architecture": resnet,
                                           "dataset": digits}, headers=operator).status_code == 201
    serve_version(client, operator, "r", resnet, tmp_path)
    ok = client.post("/v1/models/r/predict", json={"inputs": [[[[0.0] * 8] * 8]]},
                     headers=operator)
    assert ok.status_code == 200, ok.text
    # the ResNet itself would take 3 channels of 16x16 (or fail inside torch): the dataset's
    # shape decides
    wrong = client.post("/v1/models/r/predict", json={"inputs": [[[[0.0] * 16] * 16] * 3]},
                        headers=operator)
    body = problem(wrong, 422)
    assert body["expected_shape"] == [1, 8, 8]


def test_json_of_the_manifest_nested_deeply_is_a_422_not_a_recursion_error(
        client: TestClient, operator: dict[str, str], digits: str) -> None:
    line = ("[" * 10_000 + "]" * 10_000 + "\n").encode()
    detail = problem(client.post("/v1/datasets/digits/samples", content=line,
                                 headers={**operator, **NDJSON}), 422)
    assert detail["line"] == 1 and "nested too deeply" in detail["detail"]
    assert json.loads(json.dumps(detail))  # a plain problem body


def test_a_custom_architecture_is_checked_against_the_dataset_and_predict_refuses_other_shapes(
        database_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient as Client

    from app.auth import service as keys
    from app.auth.models import Role
    from app.core.db import session_scope
    from app.main import create_app
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url,
                        secret_key="test-secret", broker_url="memory://",
                        model_factory_modules="tests.api.custom_architecture")
    app = create_app(settings)
    with Client(app) as client:
        with session_scope(app.state.sessionmaker) as db_session:
            operator = {"Authorization": "Bearer " + keys.create(
                db_session, role=Role.operator, client_id="ops")[1]}
        assert client.post("/v1/datasets", json={"name": "digits"},
                           headers=operator).status_code == 201
        upload_shards(client, operator, "digits", rows(10))
        assert manifest(client, operator, rows(10)).status_code == 201
        spec = {"name": "tests.api.custom_architecture:build", "kwargs": {"num_classes": 4}}
        # too few classes for the labels: known only by running the factory's model
        body = problem(client.post("/v1/models", json={"name": "c", "architecture": spec,
                                                       "dataset": "digits"}, headers=operator),
                       422)
        assert body["classes"] == 4 and body["largest_label"] == 9
        spec["kwargs"] = {"num_classes": 10}
        assert client.post("/v1/models", json={"name": "c", "architecture": spec,
                                               "dataset": "digits"},
                           headers=operator).status_code == 201
        serve_version(client, operator, "c", spec, tmp_path)
        ok = client.post("/v1/models/c/predict", json={"inputs": [[[[0.5] * 8] * 8]]},
                         headers=operator)
        assert ok.status_code == 200, ok.text
        wrong = client.post("/v1/models/c/predict", json={"inputs": [[[[0.5] * 9] * 9]]},
                            headers=operator)
        assert problem(wrong, 422)["expected_shape"] == [1, 8, 8]
    app.state.engine.dispose()
