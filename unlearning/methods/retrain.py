"""Retrain: the exact answer. Fresh weights, the original recipe, the retain set only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearning.loops import RunContext
from unlearning.methods.base import MethodConfig, RunOutcome, UnlearningMethod, UnlearningTask
from unlearning.training import Recipe, train


@dataclass(frozen=True)
class RetrainConfig(MethodConfig):
    """Retraining has nothing to strengthen: it is already exact."""

    budget_fields = ()


def reinitialise(model: nn.Module) -> None:
    """Fresh weights in every layer that knows how to reset itself."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


class Retrain(UnlearningMethod):
    name = "retrain"
    Config = RetrainConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: RetrainConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        if task.original_recipe is None:
            raise ValueError("retrain needs the original recipe")
        recipe: Recipe = task.original_recipe
        torch.manual_seed(seed)
        reinitialise(model)
        metrics = train(model, task.retain, recipe, device=device, seed=seed,
                        progress=lambda phase, step, total, m: ctx.step("retrain", step, total, m),
                        cancel=ctx.cancelled)
        return RunOutcome(int(metrics["steps"]), {"recipe": recipe.to_dict()})
