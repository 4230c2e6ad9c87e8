"""Seeded, reproducible training from a recipe: originals, retrains, the demo and the tests."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import (
    Batch,
    Cancel,
    ProgressCallback,
    RunContext,
    SampleSet,
    augment_flip_crop,
    iterate_batches,
    run_epochs,
    schedule,
)
from unlearning.runtime import resolve_device, seed_everything


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. No augmentation by default: the membership signal the
    verifier looks for comes from memorisation, and the lab wants it visible."""

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # constant | cosine | step
    augmentation: str | None = None  # None | "flip-crop"

    def with_(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """Stable short hash of the recipe, for caches keyed by how a model was made."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def train(model: nn.Module, data: SampleSet | Iterable[Batch], recipe: Recipe,
          device: str | torch.device = "auto", seed: int = 0,
          progress: ProgressCallback | None = None, cancel: Cancel = None) -> dict[str, float]:
    """Train ``model`` in place with ``recipe`` on ``data`` (an in-memory sample set, or any
    re-iterable of ``(x, y)`` float batches such as a DataLoader). Same seed, same data, same
    device -> same weights. Returns the last epoch's mean loss, steps, wall seconds and
    process CPU seconds."""
    torch_device = resolve_device(device)
    generator = seed_everything(seed)
    model.to(torch_device)
    if isinstance(data, SampleSet):
        samples = data.to(torch_device)
        augment = ((lambda x: augment_flip_crop(x, generator))
                   if recipe.augmentation == "flip-crop" else None)
        if recipe.augmentation not in (None, "flip-crop"):
            raise ValueError(f"unknown augmentation {recipe.augmentation!r}")
        steps_per_epoch = -(-len(samples) // recipe.batch_size)

        def batches() -> Iterable[Batch]:
            return iterate_batches(samples, recipe.batch_size, torch_device, shuffle=True,
                                   generator=generator, augment=augment)
    else:
        loader = data
        steps_per_epoch = len(loader)  # type: ignore[arg-type]

        def batches() -> Iterable[Batch]:
            return ((x.to(torch_device), y.to(torch_device)) for x, y in loader)

    optimizer = make_optimizer(model, recipe)
    scheduler = schedule(optimizer, recipe.schedule, recipe.epochs * steps_per_epoch)

    def loss_fn(batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = run_epochs(model, epochs=recipe.epochs, batches=batches,
                        steps_per_epoch=steps_per_epoch, loss_fn=loss_fn, optimizer=optimizer,
                        scheduler=scheduler, device=torch_device,
                        ctx=RunContext(progress, cancel), phase="train")
    model.eval()
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
    return {"train_loss": result["loss"], "steps": result["steps"],
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started}
