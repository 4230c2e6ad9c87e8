"""Seeding a dataset and a model through the API, the way an operator would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save

SHAPE = (1, 8, 8)  # the MLP below takes 8x8 single-channel images
MLP: dict[str, Any] = {
    "name": "mlp",
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


def shard_bytes(x: torch.Tensor, y: torch.Tensor, keys: list[str]) -> bytes:
    """A sample shard as a client builds one: safetensors with `x`, `y` and the keys."""
    return save({"x": x.contiguous(), "y": y.contiguous()}, metadata={"keys": json.dumps(keys)})


def shards_for(rows: list[dict[str, Any]], shape: tuple[int, int, int] = SHAPE
               ) -> dict[str, bytes]:
    """The shards a manifest's rows point into, each row holding the row's label (rows no
    manifest line names are padding); pixels are seeded noise."""
    by_shard: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        path, _, index = str(row["locator"]).partition("#")
        by_shard.setdefault(path, {})[int(index)] = row
    generator = torch.Generator().manual_seed(0)
    shards = {}
    for path, named in by_shard.items():
        n = max(named) + 1
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)
        y = torch.tensor([int(named[i]["label"]) if i in named else 0 for i in range(n)],
                         dtype=torch.int64)
        keys = [str(named[i]["sample_key"]) if i in named else f"{path}-pad-{i}"
                for i in range(n)]
        shards[path] = shard_bytes(x, y, keys)
    return shards


def upload_shards(client: httpx.Client, operator: dict[str, str], dataset: str,
                  rows: list[dict[str, Any]], shape: tuple[int, int, int] = SHAPE) -> None:
    for path, body in shards_for(rows, shape).items():
        response = client.put(f"/v1/datasets/{dataset}/shards/{path}", content=body,
                              headers={**operator, "Content-Type": "application/octet-stream"})
        assert response.status_code == 201, response.text


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def seed_model(client: httpx.Client, operator: dict[str, str], *, dataset: str = "digits",
               model: str = "digits-mlp", policy: dict[str, Any] | None = None,
               rows: list[dict[str, Any]] | None = None) -> None:
    response = client.post("/v1/datasets", json={"name": dataset}, headers=operator)
    assert response.status_code == 201, response.text
    rows = rows if rows is not None else manifest_rows()
    upload_shards(client, operator, dataset, rows)
    response = client.post(f"/v1/datasets/{dataset}/samples", content=jsonl(rows),
                           headers={**operator, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = {"name": model, "architecture": MLP, "dataset": dataset}
    # no reference jobs in API tests (nothing runs them): requests batch as soon as due
    body["policy"] = {"verification": {"require_references": False,
                                       "build_references_on_register": False},
                      **(policy or {})}
    response = client.post("/v1/models", json=body, headers=operator)
    assert response.status_code == 201, response.text


def serve_version(client: httpx.Client, operator: dict[str, str], model: str,
                  architecture: dict[str, Any], weights_dir: Path) -> None:
    """Upload freshly initialised weights of ``architecture`` as version 1 of ``model`` and
    point `production` at it, as an operator would."""
    from unlearning.architectures import build_model
    from unlearning.weights import save_weights

    weights = save_weights(build_model(architecture), weights_dir / f"{model}-v1.safetensors")
    response = client.post(f"/v1/models/{model}/versions", content=weights.read_bytes(),
                           headers={**operator, "Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    response = client.put(f"/v1/models/{model}/aliases/production", json={"version": 1},
                          headers=operator)
    assert response.status_code == 200, response.text
