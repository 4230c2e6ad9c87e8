"""The loops every method shares, written once: in-memory sample sets and their batches, the
epoch loop with optimiser, schedule and mixed precision, evaluation, per-sample outputs for the
attacks, and progress reporting with cooperative cancellation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.runtime import autocast, eval_mode

ProgressCallback = Callable[[str, int, int, dict[str, float]], None]
Batch = tuple[torch.Tensor, torch.Tensor]


class Cancelled(Exception):
    """Raised inside a method when its caller asked it to stop."""


class CancelSignal(Protocol):
    def is_set(self) -> bool: ...


Cancel = Callable[[], bool] | CancelSignal | None


@dataclass(frozen=True)
class SampleSet:
    """Images (uint8 ``[N, C, H, W]``) and labels held in memory, CPU or GPU. Models read
    ``x / 255``; keeping uint8 makes a 60 000-image set 47 MB."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y differ in length: {len(self.x)} vs {len(self.y)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> SampleSet:
        index = index.to(self.y.device)
        return SampleSet(self.x[index], self.y[index])

    def to(self, device: torch.device) -> SampleSet:
        return SampleSet(self.x.to(device), self.y.to(device))

    def sample(self, n: int, generator: torch.Generator) -> SampleSet:
        """``n`` rows without replacement (all of them when ``n >= len``)."""
        if n >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=generator)[:n])

    @staticmethod
    def concat(*parts: SampleSet) -> SampleSet:
        return SampleSet(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def to_inputs(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True).float().div_(255.0)


def augment_flip_crop(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding, per sample, on a batch."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def iterate_batches(samples: SampleSet, batch_size: int, device: torch.device, *,
                    shuffle: bool, generator: torch.Generator | None = None,
                    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    drop_last: bool = False) -> Iterator[Batch]:
    """One pass over ``samples`` as float inputs on ``device`` and int64 labels."""
    n = len(samples)
    order = (torch.randperm(n, generator=generator) if shuffle else torch.arange(n)).to(
        samples.y.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        x = to_inputs(samples.x[index], device)
        if augment is not None:
            x = augment(x)
        yield x, samples.y[index].to(device, non_blocking=True)


def cycle_batches(samples: SampleSet, batch_size: int, device: torch.device,
                  generator: torch.Generator) -> Iterator[Batch]:
    """Endless shuffled batches, reshuffled on every pass (for a small set next to a large
    one, e.g. the forget set cycled along a pass over the retain set)."""
    while True:
        yield from iterate_batches(samples, batch_size, device, shuffle=True,
                                   generator=generator, drop_last=len(samples) >= batch_size)


class RunContext:
    """Progress reporting (throttled) and cancellation polling, for one method run."""

    def __init__(self, progress: ProgressCallback | None = None, cancel: Cancel = None,
                 min_interval: float = 0.5) -> None:
        self._progress = progress
        self._cancel = cancel
        self._min_interval = min_interval
        self._last_report = -math.inf

    def cancelled(self) -> bool:
        if self._cancel is None:
            return False
        if hasattr(self._cancel, "is_set"):
            return bool(self._cancel.is_set())
        return bool(self._cancel())

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("unlearning cancelled by the caller")

    def step(self, phase: str, step: int, total: int,
             metrics: dict[str, float] | None = None, *, force: bool = False) -> None:
        """Poll cancellation on every step; report at most every ``min_interval`` seconds,
        and always on the last step of a phase or when forced."""
        self.check()
        if self._progress is None:
            return
        now = time.monotonic()
        if force or step >= total or now - self._last_report >= self._min_interval:
            self._last_report = now
            self._progress(phase, step, total, dict(metrics or {}))


def sgd(parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float,
        momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


def schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
             milestones: tuple[float, ...] = (0.5, 0.75),
             steps_per_epoch: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate multiplier, stepped once per optimiser step: ``constant``, ``cosine`` (to
    0), ``step`` (x0.1 at each milestone fraction) or ``triangle`` (linear up for half the
    steps, then down to 0).

    With ``steps_per_epoch``, the multiplier changes only between epochs, as a scheduler
    stepped once per epoch does: ``cosine`` is ``CosineAnnealingLR(T_max=epochs)`` (1, 0.75,
    0.25 over 3 epochs) and ``triangle`` rises and falls by whole epochs without reaching 0
    (1/3, 2/3, 1, 2/3, 1/3 over 5)."""
    total = max(total_steps, 1)
    epochs = -(-total // steps_per_epoch) if steps_per_epoch else 0

    def per_step(step: int) -> float:
        progress = min(step / total, 1.0)
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "step":
            return 0.1 ** sum(progress >= m for m in milestones)
        if kind == "triangle":
            return min(2.0 * progress, 2.0 * (1.0 - progress)) if progress > 0 else 1.0 / total
        raise ValueError(f"unknown schedule {kind!r}")

    def per_epoch(step: int) -> float:
        assert steps_per_epoch
        epoch = min(step // steps_per_epoch, epochs - 1)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        if kind == "triangle":
            return min(epoch + 1, epochs - epoch) / ((epochs + 1) // 2)
        return per_step(epoch * steps_per_epoch)

    factor = per_epoch if steps_per_epoch else per_step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put normalisation layers in eval mode so running statistics stay those of the
    original (used by methods that feed unusual batches, e.g. the forget set alone)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def run_epochs(model: nn.Module, *, epochs: int, batches: Callable[[], Iterable[Any]],
               steps_per_epoch: int, loss_fn: Callable[[Any], torch.Tensor],
               optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None,
               device: torch.device, ctx: RunContext, phase: str,
               before_step: Callable[[], None] | None = None,
               freeze_norm: bool = False) -> dict[str, float]:
    """The training loop: for each epoch, for each batch, loss -> backward -> (gradient
    edit) -> step. ``batches()`` yields whatever ``loss_fn`` expects; ``before_step`` may edit
    gradients (masks, scaling). Returns the last epoch's mean loss and the step count."""
    total = epochs * steps_per_epoch
    step = 0
    mean_loss = float("nan")
    for _ in range(epochs):
        model.train()
        if freeze_norm:
            freeze_norm_statistics(model)
        running, count = 0.0, 0
        for batch in batches():
            with autocast(device):
                loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            running += float(loss.detach())
            count += 1
            ctx.step(phase, step, total, {"loss": running / count})
        mean_loss = running / max(count, 1)
    return {"loss": mean_loss, "steps": float(step)}


# Evaluation batch size by device. On the CPU (one thread, oneDNN) small batches keep the
# activations in cache: 2 048 images took cnn-small 0.22 s at 128 against 0.44 s at 1 024,
# resnet8 0.50 s against 0.83 s; on a GPU large batches keep it busy.
EVAL_BATCH_SIZE = {"cpu": 128, "cuda": 1024}


def eval_batch_size(device: torch.device) -> int:
    return EVAL_BATCH_SIZE.get(torch.device(device).type, 1024)


def forward_parts(model: nn.Module, parts: list[torch.Tensor],
                  device: torch.device) -> list[torch.Tensor]:
    """The model's outputs on several batches that enter one loss. On a GPU one forward pass
    over their concatenation (fewer, larger kernels); on the CPU one pass per batch: a
    training step over three batches of 128 through cnn-small took 0.14 s CPU as three
    passes against 0.20 s as one pass over 384 (activations that fit in cache). The same
    gradients either way wherever a sample's output depends on that sample alone (no
    normalisation layer in training mode)."""
    if torch.device(device).type == "cuda":
        return list(model(torch.cat(parts)).split([len(p) for p in parts]))
    return [model(p) for p in parts]


def predict_logits(model: nn.Module, samples: SampleSet, device: torch.device,
                   batch_size: int | None = None) -> torch.Tensor:
    """Logits (float32, on the CPU) for every sample, in order, in eval mode; ``batch_size``
    None: :func:`eval_batch_size`."""
    batch_size = batch_size or eval_batch_size(device)
    outputs = []
    with eval_mode(model), autocast(device):
        for x, _ in iterate_batches(samples, batch_size, device, shuffle=False):
            outputs.append(model(x).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def evaluate(model: nn.Module, samples: SampleSet, device: torch.device,
             batch_size: int | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy; NaN for an empty set."""
    if len(samples) == 0:
        return {"accuracy": float("nan"), "loss": float("nan")}
    logits = predict_logits(model, samples, device, batch_size)
    labels = samples.y.cpu()
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels))}
