"""GA: gradient ascent on the forget set (minimise -CE on F), nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import Batch, RunContext, run_epochs, sgd
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    shuffled,
    steps_per_pass,
)


@dataclass(frozen=True)
class GradientAscentConfig(MethodConfig):
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 256


class GradientAscent(UnlearningMethod):
    name = "ga"
    Config = GradientAscentConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: GradientAscentConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        optimizer = sgd(model.parameters(), config.lr, 0.9, config.weight_decay)
        per_epoch = steps_per_pass(task.forget, config.batch_size)

        def loss_fn(batch: Batch) -> torch.Tensor:
            x, y = batch
            return -F.cross_entropy(model(x), y)

        run_epochs(model, epochs=config.epochs,
                   batches=lambda: shuffled(task.forget, config.batch_size, device, generator),
                   steps_per_epoch=per_epoch, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=None, device=device, ctx=ctx, phase="ascent")
        return RunOutcome(config.epochs * per_epoch)
