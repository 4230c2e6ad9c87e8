"""A small, real deployment's starting point: a dataset written as a sample store with
pseudonymous subjects, and an original model trained on its train split. The demo and the
end-to-end tests both start from here, then register it all over HTTP like an operator."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from unlearning.architectures import build_model
from unlearning.data.catalog import MANIFEST_NAME, SplitSpec, iter_manifest, write_dataset_store
from unlearning.data.datasets import DatasetUnavailable, ImageDataset, load_dataset
from unlearning.data.store import load_samples
from unlearning.loops import SampleSet, evaluate
from unlearning.runtime import resolve_device
from unlearning.training import Recipe, train
from unlearning.weights import save_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    dataset: str  # what was really used (digits when Fashion-MNIST could not be fetched)
    store: str  # the store folder, relative to the dataset dir
    architecture: dict[str, Any]
    recipe: Recipe
    weights: Path
    metrics: dict[str, float]


def subset(dataset: ImageDataset, n_pool: int, n_test: int, seed: int) -> ImageDataset:
    """A seeded sample of the publisher's train pool and test split (all of it if smaller)."""
    generator = torch.Generator().manual_seed(seed)
    official = dataset.official_test
    pool = torch.nonzero(~official).flatten()
    tests = torch.nonzero(official).flatten()
    chosen_pool = pool[torch.randperm(len(pool), generator=generator)[:n_pool]]
    chosen_test = tests[torch.randperm(len(tests), generator=generator)[:n_test]]
    index = torch.cat([chosen_pool, chosen_test]).sort().values
    return ImageDataset(dataset.name, dataset.images[index].contiguous(), dataset.labels[index],
                        official[index], dataset.classes)


def build_world(root: Path, *, dataset: str = "fashion-mnist", data_dir: Path | None = None,
                n_pool: int = 6000, n_test: int = 2000, holdout_fraction: float = 0.3,
                samples_per_subject: int = 5, recipe: Recipe | None = None, seed: int = 0,
                device: str = "auto") -> World:
    """Write the store under ``root/datasets/<dataset>/store`` and train the original into
    ``root/artifacts``. A root that already holds a world built with the same arguments is
    reused as it is (training is the slow part)."""
    recipe = recipe or Recipe(epochs=20, lr=0.05, batch_size=128, weight_decay=5e-4)
    arguments = {"dataset": dataset, "n_pool": n_pool, "n_test": n_test, "seed": seed,
                 "holdout_fraction": holdout_fraction, "recipe": recipe.to_dict(),
                 "samples_per_subject": samples_per_subject}
    record = root / "world.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["arguments"] == arguments:
            return World(dataset=saved["dataset"], store=saved["store"],
                         architecture=saved["architecture"], recipe=recipe,
                         weights=root / saved["weights"], metrics=saved["metrics"])
    world = _build(root, arguments, data_dir=data_dir, recipe=recipe, device=device)
    record.write_text(json.dumps({
        "arguments": arguments, "dataset": world.dataset, "store": world.store,
        "architecture": world.architecture, "metrics": world.metrics,
        "weights": str(world.weights.relative_to(root))}, indent=1))
    return world


def _build(root: Path, arguments: dict[str, Any], *, data_dir: Path | None, recipe: Recipe,
           device: str) -> World:
    dataset, seed = arguments["dataset"], arguments["seed"]
    dataset_dir, artifacts = root / "datasets", root / "artifacts"
    try:
        full = load_dataset(dataset, data_dir or dataset_dir.parent)
    except DatasetUnavailable as error:
        log.warning("%s unavailable (%s); using scikit-learn's digits instead", dataset, error)
        dataset, full = "digits", load_dataset("digits", dataset_dir.parent)
    data = subset(full, arguments["n_pool"], arguments["n_test"], seed)
    store = f"{dataset}/store"
    store_root = dataset_dir / store
    write_dataset_store(data, store_root, samples_per_subject=arguments["samples_per_subject"],
                        split_spec=SplitSpec(holdout_fraction=arguments["holdout_fraction"],
                                             test_fraction=0.2, seed=seed))
    rows = list(iter_manifest(store_root))
    channels, size, _ = data.input_shape
    architecture = {"name": "cnn-small",
                    "kwargs": {"in_channels": channels, "input_size": size, "num_classes": 10}}
    def split(name: str) -> SampleSet:
        picked = [r for r in rows if r["split"] == name]
        loaded = load_samples(store_root, [str(r["locator"]) for r in picked])
        return SampleSet(loaded.x, loaded.y)

    model = build_model(architecture)
    started = time.perf_counter()
    train(model, split("train"), recipe, device=device, seed=seed)
    torch_device = resolve_device(device)
    metrics = {"train_accuracy": evaluate(model, split("train"), torch_device)["accuracy"],
               "test_accuracy": evaluate(model, split("test"), torch_device)["accuracy"],
               "train_seconds": time.perf_counter() - started}
    weights = save_weights(model, artifacts / f"{dataset}-original.safetensors",
                           metadata={"recipe": json.dumps(recipe.to_dict())})
    return World(dataset=dataset, store=store, architecture=architecture, recipe=recipe,
                 weights=weights, metrics=metrics)


def register_world(api: Any, operator: dict[str, str], world: World, store: Path, *,
                   dataset: str, model: str, policy: dict[str, Any]) -> None:
    """Register the world with a running API as an operator would, over HTTP: the dataset,
    its manifest from ``store``, the model with ``policy``, the original as version 1 and
    the production alias on it. ``api`` is an ``httpx.Client`` (or FastAPI's TestClient);
    a refused step raises ``httpx.HTTPStatusError`` with the problem body."""
    for response in (
        api.post("/v1/datasets", json={"name": dataset, "store": world.store},
                 headers=operator),
        api.post(f"/v1/datasets/{dataset}/samples",
                 content=(store / MANIFEST_NAME).read_bytes(),
                 headers={**operator, "Content-Type": "application/x-ndjson"}),
        api.post("/v1/models", json={"name": model, "architecture": world.architecture,
                                     "dataset": dataset, "policy": policy}, headers=operator),
        api.post(f"/v1/models/{model}/versions", content=world.weights.read_bytes(),
                 headers={**operator, "Content-Type": "application/octet-stream"}),
        api.put(f"/v1/models/{model}/aliases/production", json={"version": 1},
                headers=operator),
    ):
        if response.status_code >= 300:
            raise httpx.HTTPStatusError(f"{response.request.method} {response.request.url}: "
                                        f"{response.status_code} {response.text}",
                                        request=response.request, response=response)


def subjects_in(store: Path, n: int) -> list[str]:
    """The first ``n`` subjects of the store's train split, in manifest order."""
    owners: list[str] = []
    for row in iter_manifest(store):
        if row["split"] == "train" and row["subject_ref"] not in owners:
            owners.append(str(row["subject_ref"]))
            if len(owners) == n:
                break
    return owners


def api_keys(database_url: str, *, operator_client: str = "ops",
             requester_client: str = "acme") -> tuple[dict[str, str], dict[str, str]]:
    """An operator's and a requester's ``Authorization`` headers, the keys created in the
    database as `lethe keys create` would."""
    from app.auth import service as keys
    from app.auth.models import Role
    from app.core.db import make_engine, make_sessionmaker, session_scope

    engine = make_engine(database_url)
    with session_scope(make_sessionmaker(engine)) as db_session:
        operator = keys.create(db_session, role=Role.operator, client_id=operator_client)[1]
        requester = keys.create(db_session, role=Role.requester, client_id=requester_client)[1]
    engine.dispose()
    return {"Authorization": f"Bearer {operator}"}, {"Authorization": f"Bearer {requester}"}
