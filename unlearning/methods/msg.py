"""MSG, masked small gradients (Deep Unlearn): weights whose gradient barely distinguishes
"keep R" from "forget F" carry little of either, so 30 % of each conv layer's smallest-gradient
weights are re-initialised and fine-tuned at full rate while the rest move ten times slower.

As Deep Unlearn runs it (``munl/unlearning/kgltop2.py``): 5 epochs whose learning-rate
multipliers rise and fall by epoch, 1/3, 2/3, 1, 2/3, 1/3 (until 2026-12 Lethe ran a per-batch
triangle from 0 to 1 and back to 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import RunContext
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    fine_tune,
    shuffled,
)


@dataclass(frozen=True)
class MaskedSmallGradientsConfig(MethodConfig):
    reinit_rate: float = 0.3
    kept_gradient_scale: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 64


def accumulate_gradients(model: nn.Module, task: UnlearningTask, batch_size: int,
                         device: torch.device, generator: torch.Generator,
                         ctx: RunContext) -> None:
    """Sum of grad CE over a retain sample as large as F, plus grad of -CE over F."""
    model.zero_grad(set_to_none=True)
    retain_sample = task.retain.sample(len(task.forget), generator)
    for samples, sign in ((retain_sample, 1.0), (task.forget, -1.0)):
        for x, y in shuffled(samples, batch_size, device, generator):
            ctx.check()
            (sign * F.cross_entropy(model(x), y, reduction="sum")).backward()


class MaskedSmallGradients(UnlearningMethod):
    name = "msg"
    Config = MaskedSmallGradientsConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: MaskedSmallGradientsConfig,
            *, ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        model.train()
        accumulate_gradients(model, task, config.batch_size, device, generator, ctx)
        gradient_scales: dict[torch.Tensor, torch.Tensor] = {}
        reinitialised = 0
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, nn.Conv2d) or module.weight.grad is None:
                    continue
                weight = module.weight
                magnitude = weight.grad.abs().flatten()  # type: ignore[union-attr]
                count = int(config.reinit_rate * magnitude.numel())
                if count == 0:
                    continue
                smallest = torch.zeros_like(magnitude, dtype=torch.bool)
                smallest[torch.topk(magnitude, count, largest=False).indices] = True
                smallest = smallest.view_as(weight)
                fresh = torch.empty_like(weight)
                nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu")
                weight.copy_(torch.where(smallest, fresh, weight))
                gradient_scales[weight] = torch.where(
                    smallest, 1.0, config.kept_gradient_scale).to(weight.dtype)
                reinitialised += count
        model.zero_grad(set_to_none=True)

        def scale_gradients() -> None:
            for weight, scale in gradient_scales.items():
                if weight.grad is not None:
                    weight.grad.mul_(scale)

        steps = fine_tune(model, task.retain, epochs=config.epochs, lr=config.lr,
                          weight_decay=config.weight_decay, batch_size=config.batch_size,
                          lr_schedule="triangle", per_epoch_schedule=True, ctx=ctx, device=device,
                          generator=generator,
                          phase="fine-tune", before_step=scale_gradients)
        return RunOutcome(steps, {"reinitialised_weights": reinitialised})
