"""FT: fine-tune on the retain set only, relying on catastrophic forgetting of the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearning.loops import RunContext
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    fine_tune,
)


@dataclass(frozen=True)
class FineTuneConfig(MethodConfig):
    lr: float = 0.1
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 256


class FineTune(UnlearningMethod):
    name = "ft"
    Config = FineTuneConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: FineTuneConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        steps = fine_tune(model, task.retain, epochs=config.epochs, lr=config.lr,
                          weight_decay=config.weight_decay, batch_size=config.batch_size,
                          lr_schedule="cosine", ctx=ctx, device=device, generator=generator,
                          phase="fine-tune")
        return RunOutcome(steps)
