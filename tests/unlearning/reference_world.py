"""The per-sample test's world: the overfit subset world (2 000 Fashion-MNIST training
images, 400 of them forgotten and never seen by its retrain) with 8 reference models trained
by the engine's own :func:`train_references` on random halves of the training set.

The reference statistics are cached under ``<data dir>/test-cache`` keyed by the data, the
recipe and k (about a minute and a half to train on two cores), so only a fresh clone pays for
them; they are statistics, not weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.unlearning.conftest import CPU, World, fresh_model
from unlearning.loops import SampleSet
from unlearning.verification.references import (
    METHOD,
    ReferenceStatistics,
    sample_phi,
    train_references,
)

K = 8
SEED = 11


@dataclass
class ReferenceWorld:
    world: World
    train: SampleSet  # forget first, then retain: positions [0, n_forget) are the forget set
    n_forget: int
    statistics: ReferenceStatistics

    def memorised(self, count: int) -> np.ndarray:
        """Forget positions the original memorised most, judged by the METHOD half only,
        so the gate half that tests them was not used to choose them."""
        train_out, _ = self.statistics.out_values(METHOD, train=np.arange(self.n_forget))
        forget = self.train.subset(torch.arange(self.n_forget))
        gap = sample_phi(self.world.original, forget, CPU) - np.nanmean(train_out, axis=0)
        return np.argsort(-gap)[:count]


def build(world: World, cache_dir: Path) -> ReferenceWorld:
    data = world.data
    train = SampleSet.concat(data.forget, data.retain)
    layout = "forget first; holdout split per pair"
    key = hashlib.sha256(json.dumps({**data.cache_key, "recipe": world.recipe.to_dict(),
                                     "k": K, "seed": SEED, "layout": layout},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"references-{key}.npz"
    if path.exists():
        cached = np.load(path)
        statistics = ReferenceStatistics(cached["train_phi"], cached["holdout_phi"])
    else:
        outputs = train_references(fresh_model, world.recipe, train_set=train,
                                   holdout=data.audit, k=K, seed=SEED, device=CPU)
        statistics = ReferenceStatistics.from_outputs(outputs, k=K, n_train=len(train),
                                                      n_holdout=len(data.audit))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, train_phi=statistics.train_phi, holdout_phi=statistics.holdout_phi)
    return ReferenceWorld(world, train, len(data.forget), statistics)
