"""SalUn (Fan et al. 2024): find the weights most salient for forgetting (largest gradient of
-CE on F), then run random-label epochs updating only those."""

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
    num_outputs,
    shuffled,
)
from unlearning.methods.srl import random_label_batches


@dataclass(frozen=True)
class SalUnConfig(MethodConfig):
    saliency_fraction: float = 0.5  # share of all parameters left trainable
    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 256


def saliency_mask(model: nn.Module, task: UnlearningTask, fraction: float, batch_size: int,
                  device: torch.device, generator: torch.Generator,
                  ctx: RunContext) -> dict[str, torch.Tensor]:
    """1 on the top ``fraction`` of all parameters by |accumulated grad of -CE on F|."""
    model.zero_grad(set_to_none=True)
    for x, y in shuffled(task.forget, batch_size, device, generator):
        ctx.check()
        (-F.cross_entropy(model(x), y, reduction="sum")).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    magnitudes = torch.cat([p.grad.abs().flatten() for _, p in named])  # type: ignore[union-attr]
    keep = max(1, int(round(fraction * magnitudes.numel())))
    threshold = torch.topk(magnitudes, keep, sorted=False).values.min()
    mask = {n: (p.grad.abs() >= threshold).to(p.dtype) for n, p in named}  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    return mask


class SalUn(UnlearningMethod):
    name = "salun"
    Config = SalUnConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: SalUnConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        mask = saliency_mask(model, task, config.saliency_fraction, config.batch_size, device,
                             generator, ctx)
        classes = num_outputs(model, task.forget)
        optimizer = sgd(model.parameters(), config.lr, 0.9, config.weight_decay)
        per_epoch = -(-(len(task.retain) + len(task.forget)) // config.batch_size)
        parameters = dict(model.named_parameters())

        def apply_mask() -> None:
            for name, weights in mask.items():
                grad = parameters[name].grad
                if grad is not None:
                    grad.mul_(weights)

        def loss_fn(batch: Batch) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y)

        run_epochs(model, epochs=config.epochs,
                   batches=lambda: random_label_batches(task.retain, task.forget, classes,
                                                        config.batch_size, device, generator),
                   steps_per_epoch=per_epoch, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=None, device=device, ctx=ctx, phase="salient random-labels",
                   before_step=apply_mask)
        return RunOutcome(config.epochs * per_epoch,
                          {"trainable_fraction": config.saliency_fraction})
