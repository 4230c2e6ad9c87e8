"""Shared worlds for the engine tests: small, overfit models on real Fashion-MNIST subsets,
trained once per session with the lab's own data preparation and model cache.

Fashion-MNIST is fetched through the engine's fetch function into ``<repo>/.lethe`` (git
ignored; override with LETHE_TEST_DATA_DIR), so a fresh clone gets it on the first run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from unlearning.architectures import build_model
from unlearning.data.datasets import ImageDataset, load_fashion_mnist
from unlearning.lab import LabConfig, ModelCache, SeedData, prepare_seed
from unlearning.training import Recipe

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# Small enough to train in seconds, long enough to memorise: train accuracy reaches 1.0, so
# the forget set carries a membership signal.
OVERFIT_RECIPE = Recipe(epochs=40, lr=0.05, batch_size=64, weight_decay=0.0)
TRAIN_SIZE = 2000


@dataclass
class World:
    data: SeedData
    original: nn.Module
    retrain: nn.Module | None
    recipe: Recipe


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ.get("LETHE_TEST_DATA_DIR", REPO_ROOT / ".lethe"))


@pytest.fixture(scope="session")
def fashion(data_dir: Path) -> ImageDataset:
    return load_fashion_mnist(data_dir)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("lab-cache"))


def _world(fashion: ImageDataset, cache: ModelCache, scenario: str, *,
           with_retrain: bool, **overrides: Any) -> World:
    config = LabConfig(dataset="fashion-mnist", arch="cnn-small", scenario=scenario,
                       methods=(), seeds=(0,), data_dir=Path("."), recipe=OVERFIT_RECIPE,
                       train_size=TRAIN_SIZE, holdout_size=2000, retain_eval_size=2000,
                       **overrides)
    data = prepare_seed(config, fashion, seed=0)
    spec = {"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}}
    original, _ = cache.get_or_train({**data.cache_key, "removed": None}, spec, data.train,
                                     OVERFIT_RECIPE, 0, CPU, None)
    retrain = None
    if with_retrain:
        retrain, _ = cache.get_or_train({**data.cache_key, "removed": scenario}, spec,
                                        data.retain, OVERFIT_RECIPE, 0, CPU, None)
    return World(data, original, retrain, OVERFIT_RECIPE)


@pytest.fixture(scope="session")
def subset_world(fashion: ImageDataset, model_cache: ModelCache) -> World:
    """20 % random samples forgotten: enough members for a steady population attack."""
    return _world(fashion, model_cache, "subset", with_retrain=True, forget_fraction=0.2)


@pytest.fixture(scope="session")
def class_world(fashion: ImageDataset, model_cache: ModelCache) -> World:
    return _world(fashion, model_cache, "class", with_retrain=False, forget_class=0)


@pytest.fixture(scope="session")
def backdoor_world(fashion: ImageDataset, model_cache: ModelCache) -> World:
    return _world(fashion, model_cache, "backdoor", with_retrain=False, poison_rate=0.05)


def fresh_model() -> nn.Module:
    return build_model({"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}})


@pytest.fixture(scope="session")
def reference_world(subset_world: World, data_dir: Path):  # -> reference_world.ReferenceWorld
    from tests.unlearning import reference_world as references
    return references.build(subset_world, data_dir / "test-cache")
