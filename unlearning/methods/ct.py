"""CT, convolution transpose (Deep Unlearn): transposing every kernel spatially scrambles what
the filters memorised while keeping their statistics, and a short fine-tune on R recovers the
function that R supports.

As Deep Unlearn runs it (``munl/unlearning/kgltop5.py``): SGD with momentum 0.9, lr 1e-3,
weight decay 5e-4, 3 epochs, and ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch, so
the learning rate is 1, 0.75 and 0.25 times lr in the three epochs (until 2026-12 Lethe stepped
it every batch down to 0, which cost about 0.03 RetDev on cnn-small). Kept different: only
square kernels are transposed (a non-square kernel's transpose has another shape)."""

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
class ConvTransposeConfig(MethodConfig):
    lr: float = 1e-3
    weight_decay: float = 5e-4
    epochs: int = 3
    batch_size: int = 64


class ConvTranspose(UnlearningMethod):
    name = "ct"
    Config = ConvTransposeConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: ConvTransposeConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        transposed = 0
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size[0] == module.kernel_size[1]:
                    module.weight.copy_(module.weight.transpose(2, 3).clone())
                    transposed += 1
        steps = fine_tune(model, task.retain, epochs=config.epochs, lr=config.lr,
                          weight_decay=config.weight_decay, batch_size=config.batch_size,
                          lr_schedule="cosine", per_epoch_schedule=True, ctx=ctx, device=device,
                          generator=generator,
                          phase="fine-tune")
        return RunOutcome(steps, {"transposed_layers": transposed})
