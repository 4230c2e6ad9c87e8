"""NG+: descend on the retain set while ascending on the forget set,
``alpha * CE(R) - (1 - alpha) * CE(F)``; an epoch is one pass over R with F cycled beside it.
Normalisation statistics stay frozen so forget batches cannot shift them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import RunContext, run_epochs, sgd
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    paired_with_cycled,
    steps_per_pass,
)


@dataclass(frozen=True)
class NegGradPlusConfig(MethodConfig):
    alpha: float = 0.95
    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 256


class NegGradPlus(UnlearningMethod):
    name = "ngplus"
    Config = NegGradPlusConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: NegGradPlusConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        optimizer = sgd(model.parameters(), config.lr, 0.9, config.weight_decay)
        per_epoch = steps_per_pass(task.retain, config.batch_size)

        def loss_fn(batches: tuple) -> torch.Tensor:
            (x_r, y_r), (x_f, y_f) = batches
            return (config.alpha * F.cross_entropy(model(x_r), y_r)
                    - (1 - config.alpha) * F.cross_entropy(model(x_f), y_f))

        run_epochs(model, epochs=config.epochs,
                   batches=lambda: paired_with_cycled(task.retain, task.forget,
                                                      config.batch_size, config.batch_size,
                                                      device, generator),
                   steps_per_epoch=per_epoch, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=None, device=device, ctx=ctx, phase="neggrad+",
                   freeze_norm=True)
        return RunOutcome(config.epochs * per_epoch)
