"""SCRUB (Kurmanji et al. 2023): the original, frozen, is the teacher. Early epochs push the
student away from the teacher on F (maximise KL); every epoch pulls it back on R
(CE + KL to the teacher), so it keeps what R supports and loses what only F taught."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import Batch, RunContext, run_epochs, schedule, sgd
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    shuffled,
    steps_per_pass,
)


@dataclass(frozen=True)
class ScrubConfig(MethodConfig):
    lr: float = 5e-4
    weight_decay: float = 5e-4
    epochs: int = 5
    max_steps: int = 3  # epochs that include the forget (max) pass
    temperature: float = 2.0
    gamma: float = 1.0  # weight of CE on R
    alpha: float = 0.5  # weight of KL to the teacher on R
    retain_batch_size: int = 32
    forget_batch_size: int = 64

    budget_fields = ("epochs", "max_steps")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class Scrub(UnlearningMethod):
    name = "scrub"
    Config = ScrubConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: ScrubConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        teacher = copy.deepcopy(model).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        optimizer = sgd(model.parameters(), config.lr, 0.9, config.weight_decay)
        forget_steps = steps_per_pass(task.forget, config.forget_batch_size)
        retain_steps = steps_per_pass(task.retain, config.retain_batch_size)
        # lr x0.1 at 50/80/90 % of the epochs, stepped once per epoch
        lr_decay = schedule(optimizer, "step", config.epochs, milestones=(0.5, 0.8, 0.9))
        steps = 0

        def forget_loss(batch: Batch) -> torch.Tensor:
            x, _ = batch
            with torch.no_grad():
                teacher_logits = teacher(x)
            return -distillation_kl(model(x), teacher_logits, config.temperature)

        def retain_loss(batch: Batch) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = model(x)
            return (config.gamma * F.cross_entropy(logits, y)
                    + config.alpha * distillation_kl(logits, teacher_logits, config.temperature))

        for epoch in range(config.epochs):
            if epoch < config.max_steps:
                run_epochs(model, epochs=1, batches=lambda: shuffled(
                    task.forget, config.forget_batch_size, device, generator),
                    steps_per_epoch=forget_steps, loss_fn=forget_loss, optimizer=optimizer,
                    scheduler=None, device=device, ctx=ctx, phase=f"max epoch {epoch + 1}")
                steps += forget_steps
            run_epochs(model, epochs=1, batches=lambda: shuffled(
                task.retain, config.retain_batch_size, device, generator),
                steps_per_epoch=retain_steps, loss_fn=retain_loss, optimizer=optimizer,
                scheduler=None, device=device, ctx=ctx, phase=f"min epoch {epoch + 1}")
            steps += retain_steps
            lr_decay.step()
        return RunOutcome(steps)
