"""Reference models: trained like the original on random halves of its training data, kept
only as per-sample statistics (docs/methods.md, 'Reference models': offline LiRA).

A reference set of ``k`` models is ``k / 2`` complementary pairs: each pair splits the
training samples into two random halves and trains one model on each, so every training
sample is OUT (not trained on) in exactly one model of every pair. The first ``k / 2`` models
are the *gate* half, the rest the *method* half: the gate reads only its own half, and an
unlearning method that wants references only ever gets the other one, so the test that checks a
method was never fitted to by it. ``k`` is a multiple of 4 so that each half holds whole
pairs, and at least 8 so that each sample has 2 OUT values per half (the fewest a test reads).

Holdout samples are OUT in every model, but each pair keeps them the way it leaves training
samples out: split at random between its two models. A holdout sample thus has as many OUT
values per half as a training sample, drawn from the same random mix of models, so its score
under a candidate has the same distribution as an unseen training sample's: that is what lets
holdout samples serve as the test's null. (Keeping the holdout from the first model of each
pair only, as a first version did, biased the null by half the difference between the two
models' mean confidence, and the test's power swung with which models formed the gate half:
benchmarks/gate_power.py.)

A reference model has trained on data subjects' samples, so its weights never leave
:func:`train_references`: each is measured and dropped before the next one is trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unlearning.loops import Cancel, ProgressCallback, SampleSet, predict_logits
from unlearning.training import Recipe, train
from unlearning.verification.mia import logit_confidence

MIN_REFERENCES, MAX_REFERENCES = 8, 16
GATE, METHOD = "gate", "method"


def check_reference_count(k: int) -> int:
    """``k`` if a reference set can have that many models, else ValueError saying why."""
    if not MIN_REFERENCES <= k <= MAX_REFERENCES or k % 4:
        raise ValueError(
            f"references must be a multiple of 4 from {MIN_REFERENCES} to {MAX_REFERENCES} "
            f"(got {k}): two halves of whole complementary pairs, so each sample has at least "
            f"2 OUT models in the gate's half")
    return k


def half_of(index: int, k: int) -> str:
    """Which half reference ``index`` of ``k`` belongs to."""
    return GATE if index < k // 2 else METHOD


def sample_phi(model: nn.Module, samples: SampleSet, device: torch.device) -> np.ndarray:
    """The per-sample statistic every test here reads: the logit-scaled true-class confidence
    ``log p_y - log(1 - p_y)`` (float64)."""
    if len(samples) == 0:
        return np.empty(0)
    logits = predict_logits(model, samples, device)
    return logit_confidence(logits.double(), samples.y.cpu()).numpy()


@dataclass(frozen=True)
class ReferencePlan:
    """Which training samples each reference model trains on: a pure function of the seed,
    so a restarted job trains the same models and a reader can re-derive IN/OUT."""

    k: int
    n_train: int
    seed: int
    n_holdout: int = 0

    def __post_init__(self) -> None:
        check_reference_count(self.k)

    def _half(self, index: int, n: int, stream: int) -> np.ndarray:
        pair, side = divmod(index, 2)
        order = np.random.default_rng([self.seed, pair, stream]).permutation(n)
        mask = np.zeros(n, dtype=bool)
        mask[order[: n // 2]] = True
        return mask if side == 0 else ~mask

    def trains_on(self, index: int) -> np.ndarray:
        """Boolean mask over training positions: True where reference ``index`` trains."""
        return self._half(index, self.n_train, 0)

    def keeps_holdout(self, index: int) -> np.ndarray:
        """Boolean mask over holdout positions: the half whose values reference ``index``
        keeps (the pair's other model keeps the rest)."""
        return self._half(index, self.n_holdout, 1)


@dataclass
class ReferenceOutput:
    """What one reference model leaves behind: its statistic on the training samples it did
    not train on and on its share of the holdout (positions and values of each)."""

    index: int
    out_positions: np.ndarray
    out_phi: np.ndarray
    holdout_positions: np.ndarray
    holdout_phi: np.ndarray
    seconds: float


@dataclass
class ReferenceStatistics:
    """OUT statistics of one reference set: ``train_phi [k, n_train]`` and
    ``holdout_phi [k, n_holdout]``, NaN where a model trained on the sample (or left the
    holdout sample to the other model of its pair)."""

    train_phi: np.ndarray
    holdout_phi: np.ndarray

    @property
    def k(self) -> int:
        return int(self.train_phi.shape[0])

    def rows(self, half: str) -> slice:
        return slice(0, self.k // 2) if half == GATE else slice(self.k // 2, self.k)

    def out_values(self, half: str, *, train: np.ndarray | None = None,
                   holdout: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``[k/2, n]`` OUT values of one half for the given training and holdout positions
        (all of them when None)."""
        rows = self.rows(half)
        train_part = self.train_phi[rows] if train is None else self.train_phi[rows][:, train]
        holdout_part = (self.holdout_phi[rows] if holdout is None
                        else self.holdout_phi[rows][:, holdout])
        return train_part, holdout_part

    @classmethod
    def from_outputs(cls, outputs: list[ReferenceOutput], *, k: int, n_train: int,
                     n_holdout: int) -> ReferenceStatistics:
        train_phi = np.full((k, n_train), np.nan)
        holdout_phi = np.full((k, n_holdout), np.nan)
        for output in outputs:
            train_phi[output.index, output.out_positions] = output.out_phi
            holdout_phi[output.index, output.holdout_positions] = output.holdout_phi
        return cls(train_phi, holdout_phi)


def train_references(
    factory: Callable[[], nn.Module], recipe: Recipe, *, train_set: SampleSet,
    holdout: SampleSet, k: int, seed: int, device: torch.device,
    skip: set[int] | None = None, on_reference: Callable[[ReferenceOutput], None] | None = None,
    progress: ProgressCallback | None = None, cancel: Cancel = None,
) -> list[ReferenceOutput]:
    """Train the plan's ``k`` reference models one by one (indices in ``skip`` were done by
    an earlier delivery), measure each on what it did not train on, hand the result to
    ``on_reference`` (which stores it) and drop the model. Returns the new outputs."""
    plan = ReferencePlan(k=k, n_train=len(train_set), seed=seed, n_holdout=len(holdout))
    outputs = []
    for index in range(k):
        if skip and index in skip:
            continue
        started = time.perf_counter()
        mask = plan.trains_on(index)
        model = factory()
        train(model, train_set.subset(torch.from_numpy(np.flatnonzero(mask))), recipe,
              device=device, seed=seed * 1000 + index,
              progress=_offset(progress, index, k), cancel=cancel)
        out_positions = np.flatnonzero(~mask)
        holdout_positions = np.flatnonzero(plan.keeps_holdout(index))
        output = ReferenceOutput(
            index=index, out_positions=out_positions,
            out_phi=sample_phi(model, train_set.subset(torch.from_numpy(out_positions)), device),
            holdout_positions=holdout_positions,
            holdout_phi=sample_phi(model, holdout.subset(torch.from_numpy(holdout_positions)),
                                   device),
            seconds=time.perf_counter() - started)
        del model  # a reference model's weights hold training subjects' data: never kept
        if on_reference is not None:
            on_reference(output)
        outputs.append(output)
    return outputs


def _offset(progress: ProgressCallback | None, index: int, k: int
            ) -> ProgressCallback | None:
    if progress is None:
        return None

    def report(phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        progress(f"reference {index + 1}/{k}: {phase}", step, total, metrics)

    return report
