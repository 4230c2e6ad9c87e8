"""A deployment to run jobs against: an original trained once per session on a Fashion-MNIST
subset, and per test a fresh database and a private copy of the sample store (jobs wipe
forgotten samples' bytes, so stores are never shared between tests)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import service as keys
from app.auth.models import Role
from app.core.config import Settings
from app.core.db import session_scope
from app.main import create_app
from tests.conftest import app_of
from unlearning.training import Recipe
from worker.context import WorkerContext
from worker.world import World, build_world, register_world

REPO = Path(__file__).resolve().parents[2]
# Small batches, long enough to memorise the training split: the membership signal to remove.
ORIGINAL_RECIPE = Recipe(epochs=40, lr=0.02, batch_size=32, weight_decay=0.0)
MODEL = "fashion-cnn"


@pytest.fixture(scope="session")
def world() -> World:
    """Trained once and kept in the git-ignored .lethe/ (reused while its arguments match);
    tests only ever work on copies of its store."""
    return cached_world()


def cached_world() -> World:
    """The world the worker tests (and tests/reliability) run jobs against."""
    return build_world(REPO / ".lethe" / "test-cache" / "world", data_dir=REPO / ".lethe",
                       n_pool=2500, n_test=1000, holdout_fraction=0.4, samples_per_subject=8,
                       recipe=ORIGINAL_RECIPE, device="cpu")


@dataclass
class Deployment:
    client: TestClient
    settings: Settings
    operator: dict[str, str]
    requester: dict[str, str]
    auditor: dict[str, str]
    world: World

    @property
    def worker(self) -> WorkerContext:
        return WorkerContext(self.settings)

    def subjects(self, n: int) -> list[str]:
        """``n`` subjects that own training samples."""
        owners: list[str] = []
        for row in self.manifest():
            if row["split"] == "train" and row["subject_ref"] not in owners:
                owners.append(str(row["subject_ref"]))
            if len(owners) == n:
                break
        return owners

    def samples_of(self, subjects: list[str], *, split: str | None = None) -> int:
        return sum(1 for row in self.manifest() if row["subject_ref"] in subjects
                   and (split is None or row["split"] == split))

    def manifest(self) -> list[dict[str, Any]]:
        from unlearning.data.catalog import iter_manifest

        return list(iter_manifest(self.settings.resolved_dataset_dir / self.world.store))


def register(client: TestClient, operator: dict[str, str], world: World,
             policy: dict[str, Any]) -> None:
    """Dataset, manifest, model, original weights and the production alias, over HTTP."""
    settings: Settings = app_of(client).state.settings
    register_world(client, operator, world, settings.resolved_dataset_dir / world.store,
                   dataset="fashion", model=MODEL, policy=policy)


def make_deployment(database_url: str, data_dir: Path, world: World,
                    policy: dict[str, Any]) -> Iterator[Deployment]:
    settings = Settings(data_dir=data_dir, database_url=database_url, secret_key="test",
                        device="cpu", heartbeat_seconds=1.0)
    store = settings.resolved_dataset_dir / world.store
    shutil.copytree(world.weights.parent.parent / "datasets" / world.store, store)
    app = create_app(settings)
    with TestClient(app) as client:
        with session_scope(app.state.sessionmaker) as db_session:
            headers = {role: {"Authorization": "Bearer " + keys.create(
                db_session, role=Role(role), client_id=client_id)[1]}
                for role, client_id in (("operator", "ops"), ("requester", "acme"),
                                        ("auditor", "compliance"))}
        register(client, headers["operator"], world, policy)
        yield Deployment(client, settings, headers["operator"], headers["requester"],
                         headers["auditor"], world)
    app.state.engine.dispose()


# Tests about other things than per-sample evidence opt out of reference statistics (a
# reference job trains 8 models); tests/worker/test_references.py is about them.
NO_REFERENCES: dict[str, Any] = {"require_references": False,
                                 "build_references_on_register": False}
FAST_POLICY: dict[str, Any] = {
    "method_config": {"max_steps": 200},
    "verification": NO_REFERENCES,
    "batching": {"max_batch": 50, "max_wait_seconds": 0},
    "training_recipe": ORIGINAL_RECIPE.to_dict(),
    # The purge tests (here and in tests/reliability) expect weights holding erased data to go
    # at the first maintenance pass, not after the default 7 days.
    "grace_days": 0,
}


@pytest.fixture
def deployment(sqlite_url: str, tmp_path: Path, world: World) -> Iterator[Deployment]:
    """On SQLite: each job trains for real, so the PostgreSQL runs are kept to the tests that
    are about the database (test_pipeline's first test, and the end-to-end tests)."""
    yield from make_deployment(sqlite_url, tmp_path / "data", world, FAST_POLICY)
