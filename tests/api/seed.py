"""Seeding a dataset and a model through the API, the way an operator would."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

MLP = {"name": "mlp",
       "kwargs": {"in_channels": 1, "input_size": 8, "num_classes": 10, "hidden": 16}}


def manifest_rows(n_subjects: int = 5, per_subject: int = 4, holdout: int = 10,
                  dataset_prefix: str = "s") -> list[dict[str, Any]]:
    rows = []
    for subject in range(n_subjects):
        for j in range(per_subject):
            index = subject * per_subject + j
            rows.append({"sample_key": f"{dataset_prefix}-{index:05d}",
                         "subject_ref": f"customer-{subject}", "label": index % 10,
                         "split": "train", "locator": f"train.safetensors#{index}"})
    for index in range(holdout):
        rows.append({"sample_key": f"{dataset_prefix}-h{index:05d}", "subject_ref": None,
                     "label": index % 10, "split": "holdout",
                     "locator": f"holdout.safetensors#{index}"})
    return rows


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def seed_model(client: TestClient, operator: dict[str, str], *, dataset: str = "digits",
               model: str = "digits-mlp", policy: dict[str, Any] | None = None,
               rows: list[dict[str, Any]] | None = None) -> None:
    response = client.post("/v1/datasets", json={"name": dataset}, headers=operator)
    assert response.status_code == 201, response.text
    response = client.post(f"/v1/datasets/{dataset}/samples", content=jsonl(
        rows if rows is not None else manifest_rows()),
        headers={**operator, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = {"name": model, "architecture": MLP, "dataset": dataset}
    # no reference jobs in API tests (nothing runs them): requests batch as soon as due
    body["policy"] = {"verification": {"require_references": False,
                                       "build_references_on_register": False},
                      **(policy or {})}
    response = client.post("/v1/models", json=body, headers=operator)
    assert response.status_code == 201, response.text
