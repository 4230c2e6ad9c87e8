"""SRL: keep training on R together with F, F relabelled uniformly at random on every access,
so whatever the model memorised about F's labels is overwritten with noise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import Batch, RunContext, SampleSet, iterate_batches, run_epochs, sgd
from unlearning.methods.base import (
    MethodConfig,
    RunOutcome,
    UnlearningMethod,
    UnlearningTask,
    num_outputs,
)


@dataclass(frozen=True)
class SuccessiveRandomLabelsConfig(MethodConfig):
    lr: float = 0.1
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 256


def random_label_batches(retain: SampleSet, forget: SampleSet, num_classes: int,
                         batch_size: int, device: torch.device,
                         generator: torch.Generator) -> Iterator[Batch]:
    """One shuffled pass over R u F; forget rows get a fresh uniform label each time they
    are drawn. Shared with SalUn."""
    union = SampleSet.concat(retain, forget)
    is_forget = torch.zeros(len(union), dtype=torch.bool, device=union.y.device)
    is_forget[len(retain):] = True
    # carry the forget flag through the shuffle as a label offset
    flagged = SampleSet(union.x, union.y + num_classes * is_forget.long())
    for x, y in iterate_batches(flagged, batch_size, device, shuffle=True, generator=generator):
        forget_rows = y >= num_classes
        random_labels = torch.randint(0, num_classes, (len(y),), generator=generator)
        yield x, torch.where(forget_rows, random_labels.to(device), y)


class SuccessiveRandomLabels(UnlearningMethod):
    name = "srl"
    Config = SuccessiveRandomLabelsConfig

    def run(self, model: nn.Module, task: UnlearningTask,
            config: SuccessiveRandomLabelsConfig, *, ctx: RunContext, device: torch.device,
            generator: torch.Generator, seed: int) -> RunOutcome:
        classes = num_outputs(model, task.forget)
        optimizer = sgd(model.parameters(), config.lr, 0.9, config.weight_decay)
        per_epoch = -(-(len(task.retain) + len(task.forget)) // config.batch_size)

        def loss_fn(batch: Batch) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y)

        run_epochs(model, epochs=config.epochs,
                   batches=lambda: random_label_batches(task.retain, task.forget, classes,
                                                        config.batch_size, device, generator),
                   steps_per_epoch=per_epoch, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=None, device=device, ctx=ctx, phase="random-labels")
        return RunOutcome(config.epochs * per_epoch)
