"""What every unlearning method shares: the inputs, the result, the config base with its
"stronger settings" for escalation, and the one entry point that copies the model, seeds,
times and reports, so each method file holds only its algorithm."""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import (
    Batch,
    Cancel,
    ProgressCallback,
    RunContext,
    SampleSet,
    cycle_batches,
    iterate_batches,
    run_epochs,
    schedule,
    sgd,
    to_inputs,
)
from unlearning.runtime import eval_mode, load_lazy_modules, resolve_device, seed_everything
from unlearning.scenarios import Scenario
from unlearning.training import Recipe


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. ``stronger()`` is what escalation calls after a failed
    verification: it multiplies the fields named in ``budget_fields`` (epochs, step budgets)
    by ``factor``; methods with other levers override it."""

    budget_fields: ClassVar[tuple[str, ...]] = ("epochs",)

    def stronger(self, factor: float = 2.0) -> MethodConfig:
        changes = {}
        for name in self.budget_fields:
            value = getattr(self, name)
            changes[name] = type(value)(max(value + 1, round(value * factor))) \
                if isinstance(value, int) else value * factor
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MethodReferences:
    """The method's half of a model's reference statistics (docs/methods.md, "Reference
    models"): OUT values of the per-sample statistic phi (the logit-scaled true-class
    confidence) under reference models that never trained on the sample. ``forget``
    ``[m, n_forget]`` is aligned with the forget set, ``unseen`` ``[m, n_unseen]`` with the
    unseen slice; NaN where a reference trained on the sample (or left it to its pair's other
    model). The gate's half never reaches a method."""

    forget: np.ndarray
    unseen: np.ndarray

    def __post_init__(self) -> None:
        if self.forget.ndim != 2 or self.unseen.ndim != 2 \
                or self.forget.shape[0] != self.unseen.shape[0]:
            raise ValueError("reference statistics must be [m, n] with the same m for the "
                             "forget set and the unseen slice")


@dataclass(frozen=True)
class UnlearningTask:
    """The data a method sees (docs/methods.md, "Data slices"). ``unseen``: the method's half
    of the holdout, data the model never trained on; the other half, ``audit``, is the
    verifier's and never reaches a method. ``validation``: optional extra holdout a method may
    use for its own checks; ``original_recipe``: how the model was trained (retrain needs it);
    ``references``: the method's half of the reference statistics, when the model has them;
    ``min_steps``: steps a method that stops early must take even when it finds nothing to
    do (the policy's ``min_steps``; 0 lets it return the model unchanged)."""

    retain: SampleSet
    forget: SampleSet
    unseen: SampleSet
    scenario: Scenario
    validation: SampleSet | None = None
    original_recipe: Recipe | None = None
    references: MethodReferences | None = None
    min_steps: int = 0

    def __post_init__(self) -> None:
        if self.references is not None and (
                self.references.forget.shape[1] != len(self.forget)
                or self.references.unseen.shape[1] != len(self.unseen)):
            raise ValueError(
                f"reference statistics cover {self.references.forget.shape[1]} forget and "
                f"{self.references.unseen.shape[1]} unseen samples; the task has "
                f"{len(self.forget)} and {len(self.unseen)}")


@dataclass
class UnlearnResult:
    """``seconds``: wall clock; ``cpu_seconds``: CPU time of the whole process (all threads),
    a fairer basis for comparing run times on a machine other work shares."""

    model: nn.Module
    steps: int
    seconds: float
    cpu_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class UnlearningMethod(ABC):
    """One unlearning algorithm. Subclasses set ``name`` and ``Config`` and implement
    :meth:`run`; callers use :meth:`unlearn`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]

    def unlearn(self, model: nn.Module, *, retain: SampleSet, forget: SampleSet,
                unseen: SampleSet, validation: SampleSet | None = None,
                original_recipe: Recipe | None = None, scenario: Scenario | None = None,
                references: MethodReferences | None = None, min_steps: int = 0,
                config: MethodConfig | None = None, device: str | torch.device = "auto",
                seed: int = 0, progress: ProgressCallback | None = None,
                cancel: Cancel = None) -> UnlearnResult:
        """Return an unlearned copy of ``model`` (the argument is left untouched).

        ``progress(phase, step, total, metrics)`` is called at most twice a second;
        ``cancel`` (a callable returning True, or an object with ``is_set()`` such as a
        ``threading.Event``) is polled every step and raises :class:`Cancelled`."""
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} expects {self.Config.__name__}, "
                            f"got {type(config).__name__}")
        torch_device = resolve_device(device)
        generator = seed_everything(seed)
        task = UnlearningTask(
            retain=retain.to(torch_device), forget=forget.to(torch_device),
            unseen=unseen.to(torch_device), scenario=scenario or Scenario(),
            validation=validation.to(torch_device) if validation is not None else None,
            original_recipe=original_recipe, references=references, min_steps=min_steps)
        if len(task.forget) == 0:
            raise ValueError("the forget set is empty")
        working = copy.deepcopy(model).to(torch_device)
        ctx = RunContext(progress, cancel)
        load_lazy_modules()
        started, cpu_started = time.perf_counter(), time.process_time()
        outcome = self.run(working, task, config, ctx=ctx, device=torch_device,
                           generator=generator, seed=seed)
        working.eval()
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        return UnlearnResult(model=outcome.model if outcome.model is not None else working,
                             steps=outcome.steps, seconds=time.perf_counter() - started,
                             cpu_seconds=time.process_time() - cpu_started,
                             details={"config": config.to_dict(), **outcome.details})

    @abstractmethod
    def run(self, model: nn.Module, task: UnlearningTask, config: Any, *, ctx: RunContext,
            device: torch.device, generator: torch.Generator, seed: int) -> RunOutcome:
        """Unlearn in place on ``model`` (already a private copy on ``device``)."""


@dataclass
class RunOutcome:
    steps: int
    details: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # set when the method returns a different module


def num_outputs(model: nn.Module, samples: SampleSet) -> int:
    """Number of classes the model predicts, read from one forward pass."""
    with eval_mode(model):
        return int(model(to_inputs(samples.x[:1], samples.x.device)).shape[1])


def steps_per_pass(samples: SampleSet, batch_size: int) -> int:
    return -(-len(samples) // batch_size)


def shuffled(samples: SampleSet, batch_size: int, device: torch.device,
             generator: torch.Generator) -> Iterator[Batch]:
    return iterate_batches(samples, batch_size, device, shuffle=True, generator=generator)


def paired_with_cycled(primary: SampleSet, secondary: SampleSet, batch_size: int,
                       secondary_batch_size: int, device: torch.device,
                       generator: torch.Generator) -> Iterator[tuple[Batch, Batch]]:
    """One pass over ``primary`` with a batch of ``secondary`` (cycled) beside each batch."""
    cycled = cycle_batches(secondary, secondary_batch_size, device, generator)
    for batch in shuffled(primary, batch_size, device, generator):
        yield batch, next(cycled)


def fine_tune(model: nn.Module, samples: SampleSet, *, epochs: int, lr: float,
              weight_decay: float, batch_size: int, lr_schedule: str, ctx: RunContext,
              device: torch.device, generator: torch.Generator, phase: str,
              momentum: float = 0.9, per_epoch_schedule: bool = False,
              parameter_groups: list[dict[str, Any]] | None = None,
              before_step: Callable[[], None] | None = None) -> int:
    """Cross-entropy fine-tuning with SGD, shared by FT, CT, MSG and retrain-like passes;
    returns the number of optimiser steps. ``per_epoch_schedule``: the learning rate changes
    between epochs only (see :func:`unlearning.loops.schedule`)."""
    optimizer = sgd(parameter_groups or model.parameters(), lr, momentum, weight_decay)
    total = epochs * steps_per_pass(samples, batch_size)
    scheduler = schedule(optimizer, lr_schedule, total, steps_per_epoch=steps_per_pass(
        samples, batch_size) if per_epoch_schedule else None)

    def loss_fn(batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    run_epochs(model, epochs=epochs,
               batches=lambda: shuffled(samples, batch_size, device, generator),
               steps_per_epoch=steps_per_pass(samples, batch_size), loss_fn=loss_fn,
               optimizer=optimizer, scheduler=scheduler, device=device, ctx=ctx, phase=phase,
               before_step=before_step)
    return total
