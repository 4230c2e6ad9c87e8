"""What match pulls on and towards: per-sample statistics of the label a sample was trained
with, the distances between a batch and its targets, and the two kinds of target: the
quantiles of the original's statistic on unseen data (by distribution), or each forget sample's
own never-seen value read from the method's half of the reference statistics (per sample)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unlearning.methods.base import MethodReferences
from unlearning.verification.mia import logit_confidence


def label_statistic(logits: torch.Tensor, labels: torch.Tensor, kind: str,
                    margin: float = 0.0) -> torch.Tensor:
    """``confidence``: logit-scaled confidence c; ``loss``: cross-entropy (= softplus(-c) in
    the one-against-the-rest view); ``margin``: softplus(margin - c), the loss of a label that
    must win by ``margin`` (its gradient in c is ~1 below the margin, like the confidence's,
    and fades above it, like the loss's); ``probability``: p_y."""
    if kind == "confidence":
        return logit_confidence(logits.float(), labels)
    if kind == "margin":
        return F.softplus(margin - logit_confidence(logits.float(), labels))
    if kind == "loss":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if kind == "probability":
        return F.softmax(logits.float(), dim=1).gather(1, labels.long()[:, None]).squeeze(1)
    raise ValueError(f"unknown statistic {kind!r}")


def gap_penalty(gap: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean penalty on per-sample gaps: ``w1`` (absolute), ``w2`` (squared) or ``huber``
    (squared below 1, absolute above: the pull grows with the gap, so nearly matched samples
    are left alone, and is bounded, so the tail cannot blow the step up)."""
    if distance == "w1":
        return gap.abs().mean()
    if distance == "w2":
        return gap.pow(2).mean()
    if distance == "huber":
        return F.smooth_l1_loss(gap, torch.zeros_like(gap), beta=1.0)
    raise ValueError(f"unknown distance {distance!r}")


def quantile_targets(distribution: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The quantiles of ``distribution`` at the mid-ranks of a batch of ``batch_size``."""
    levels = (torch.arange(batch_size, dtype=torch.float32, device=distribution.device) + 0.5)
    return torch.quantile(distribution.float(), levels / batch_size)


def wasserstein_to_targets(statistic: torch.Tensor, targets: torch.Tensor,
                           distance: str) -> torch.Tensor:
    """1-D optimal transport between a batch and sorted targets: sort, pair by rank."""
    return gap_penalty(statistic.sort().values - targets, distance)


def anchor_penalty(logits: torch.Tensor, original_logits: torch.Tensor, labels: torch.Tensor,
                   *, kind: str, statistic: str, margin: float,
                   distance: str) -> torch.Tensor:
    """How far predictions moved from the original's: ``kl``, KL(f0 || f) of the original's
    predicted distribution f0 from the current one f (``F.kl_div(log f, log f0)``), or
    ``statistic``, the per-sample change of ``statistic`` under ``distance`` (first order, as
    strong as the matching pull, so a change that moves unseen data as much as the forget set
    cancels out)."""
    if kind == "kl":
        return F.kl_div(F.log_softmax(logits.float(), dim=1),
                        F.log_softmax(original_logits.float(), dim=1),
                        reduction="batchmean", log_target=True)
    if kind == "statistic":
        return gap_penalty(label_statistic(logits, labels, statistic, margin)
                           - label_statistic(original_logits, labels, statistic, margin),
                           distance)
    raise ValueError(f"unknown anchor loss {kind!r}")


def out_means(values: np.ndarray) -> np.ndarray:
    """Per-sample mean of ``[m, n]`` OUT values (NaN where missing); a sample with none gets
    the mean over all samples."""
    counts = np.sum(~np.isnan(values), axis=0)
    means = np.full(values.shape[1], np.nan)
    means[counts > 0] = np.nanmean(values[:, counts > 0], axis=0)
    fallback = float(np.nanmean(means)) if np.any(counts > 0) else 0.0
    return np.where(np.isnan(means), fallback, means)


@dataclass(frozen=True)
class PerSampleTargets:
    """Each sample's expected never-seen value of phi, the logit-scaled confidence, and the
    distribution of unseen data's scores around it.

    The reference models train on half the data, so their OUT values are not what a model
    trained on everything but the sample gives: ``expected = a + b * mean OUT`` is the linear
    prediction, fitted on ``unseen_match`` where the original is itself such a model, and
    ``spread`` the residuals' standard deviation. A sample's score ``(phi - expected) /
    spread`` says how much more confident the model is than it would be had it never seen the
    sample; ``null`` holds unseen_match's scores under the original, what a never-seen
    sample's scores look like. The pull moves a forget batch's scores onto the null's
    quantiles by rank (1-D optimal transport in score space): a memorised sample is pulled
    down by how far it stands above its own expected value, however confident an easy
    sample's unseen value may be."""

    forget_expected: torch.Tensor  # [n_forget]
    match_expected: torch.Tensor  # [n_unseen_match]
    stop_expected: torch.Tensor  # [n_unseen_stop]
    null: torch.Tensor  # [n_unseen_match] scores under the original
    spread: float
    slope: float
    intercept: float

    @classmethod
    def fit(cls, references: MethodReferences, *, original_phi_match: np.ndarray,
            match_positions: np.ndarray, stop_positions: np.ndarray) -> PerSampleTargets:
        unseen_mean = out_means(references.unseen)
        x, y = unseen_mean[match_positions], original_phi_match.astype(np.float64)
        slope, intercept = np.polyfit(x, y, 1) if len(x) >= 3 and np.ptp(x) > 0 \
            else (1.0, float(np.mean(y - x)) if len(x) else 0.0)
        residuals = y - (intercept + slope * x)
        spread = max(float(np.std(residuals)), 1e-3)
        return cls(forget_expected=torch.from_numpy(
                       intercept + slope * out_means(references.forget)).float(),
                   match_expected=torch.from_numpy(intercept + slope * x).float(),
                   stop_expected=torch.from_numpy(
                       intercept + slope * unseen_mean[stop_positions]).float(),
                   null=torch.from_numpy(residuals / spread).float(),
                   spread=spread, slope=float(slope), intercept=float(intercept))

    def scores(self, phi: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        """How far above its expected never-seen value each sample is, in spreads."""
        return (phi.float() - expected.to(phi.device)) / self.spread

    def pull(self, phi: torch.Tensor, positions: torch.Tensor, distance: str,
             null: torch.Tensor | None = None) -> torch.Tensor:
        """The matching loss of a forget batch (``positions`` in the forget set), in logit
        units: its scores, sorted, against the quantiles of ``null`` (default: unseen_match's
        scores under the original) at the same ranks."""
        scores = self.scores(phi, self.forget_expected.to(phi.device)[positions])
        targets = quantile_targets((self.null if null is None else null).to(phi.device),
                                   len(scores))
        return self.spread * wasserstein_to_targets(scores, targets, distance)
