"""Membership-inference attacks on per-sample prediction statistics (docs/methods.md,
'Population membership attack' and 'KS test').

The population attack is what the gate and the lab report: members (the forget set) and an
equal number of non-members (unseen data) are told apart by a logistic regression on per-sample
features, over stratified shuffle splits; a blind attacker scores 0.5. The ``loss`` feature set
is the standard one; ``strong`` adds confidence, entropy and margin features, which find more
when the loss alone is ambiguous. For forget sets too small for a population attack, the
Kolmogorov-Smirnov test asks whether the forget losses rank among holdout losses as uniformly
as unseen samples would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURE_SETS = ("loss", "strong")


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy per sample, in float64: in float32 every confidently classified sample
    has a loss of exactly 0, and those ties would blind the attack for the wrong reason."""
    return F.cross_entropy(logits.double(), labels.long(), reduction="none").numpy()


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_y - log(1 - p_y)``: the true-class confidence on the logit scale, the statistic
    LiRA models as Gaussian. Computed stably from log-softmax, in the logits' precision."""
    log_probs = F.log_softmax(logits, dim=1)
    log_p = log_probs.gather(1, labels.long()[:, None]).squeeze(1)
    others = log_probs.scatter(1, labels.long()[:, None], -math.inf)
    return log_p - torch.logsumexp(others, dim=1)


def attack_features(logits: torch.Tensor, labels: torch.Tensor,
                    feature_set: str = "loss") -> np.ndarray:
    """Per-sample features ``[n, k]`` an attacker reads from a model's outputs."""
    if feature_set == "loss":
        return per_sample_loss(logits, labels)[:, None]
    if feature_set != "strong":
        raise ValueError(f"unknown feature set {feature_set!r}; choose from {FEATURE_SETS}")
    logits = logits.double()
    log_probs = F.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    loss = -log_probs.gather(1, labels.long()[:, None]).squeeze(1)
    entropy = -(probs * log_probs).sum(1)
    true_logit = logits.gather(1, labels.long()[:, None]).squeeze(1)
    best_other = logits.scatter(1, labels.long()[:, None], -math.inf).max(1).values
    features = torch.stack([
        torch.log(loss.clamp_min(1e-12)),  # log scale spreads the near-zero losses of members
        logit_confidence(logits, labels),
        entropy,
        true_logit - best_other,  # margin
        probs.max(1).values,
    ], dim=1)
    return features.numpy()


@dataclass(frozen=True)
class MIAResult:
    """Mean accuracy and ROC AUC over the splits, the sizes they rest on, and a 95 % interval
    for the accuracy (normal approximation on one split's test size: the splits share samples,
    so averaging them does not shrink the sampling error)."""

    accuracy: float
    auc: float
    accuracy_std: float
    ci_low: float
    ci_high: float
    n_members: int
    n_nonmembers: int
    n_splits: int

    @property
    def indiscernibility(self) -> float:
        """1 at chance level, 0 when the attacker is always right (or always wrong)."""
        return 1.0 - abs(self.accuracy - 0.5) / 0.5

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "indiscernibility": self.indiscernibility}


def population_mia(member_features: np.ndarray, nonmember_features: np.ndarray, *,
                   n_splits: int = 10, test_size: float = 0.3, seed: int = 0) -> MIAResult:
    """Logistic-regression attack, members vs non-members, balanced to the smaller side."""
    rng = np.random.default_rng(seed)
    members = np.asarray(member_features, dtype=np.float64).reshape(len(member_features), -1)
    nonmembers = np.asarray(nonmember_features, dtype=np.float64).reshape(
        len(nonmember_features), -1)
    n = min(len(members), len(nonmembers))
    if n < 10:
        raise ValueError(f"a population attack needs at least 10 samples per side, got {n}; "
                         "batch requests or use the KS test")
    members = members[rng.choice(len(members), n, replace=False)]
    nonmembers = nonmembers[rng.choice(len(nonmembers), n, replace=False)]
    features = np.nan_to_num(np.concatenate([members, nonmembers]), posinf=1e6, neginf=-1e6)
    is_member = np.concatenate([np.ones(n), np.zeros(n)])
    splitter = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_size,
                                      random_state=int(rng.integers(2**31)))
    accuracies, aucs = [], []
    for train_index, test_index in splitter.split(features, is_member):
        attack = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        attack.fit(features[train_index], is_member[train_index])
        scores = attack.predict_proba(features[test_index])[:, 1]
        accuracies.append(float(((scores >= 0.5) == is_member[test_index]).mean()))
        aucs.append(float(roc_auc_score(is_member[test_index], scores)))
    accuracy = float(np.mean(accuracies))
    n_test = max(int(round(test_size * 2 * n)), 1)
    half_width = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n_test)
    return MIAResult(accuracy=accuracy, auc=float(np.mean(aucs)),
                     accuracy_std=float(np.std(accuracies)),
                     ci_low=max(0.0, accuracy - half_width),
                     ci_high=min(1.0, accuracy + half_width),
                     n_members=n, n_nonmembers=n, n_splits=n_splits)


@dataclass(frozen=True)
class KSResult:
    """One-sample KS test of the forget losses' percentiles among holdout losses against the
    uniform distribution: a small p-value means the forget set does not look unseen."""

    statistic: float
    p_value: float
    n: int
    n_reference: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ks_forget_test(forget_losses: np.ndarray, holdout_losses: np.ndarray) -> KSResult:
    """Valid at any forget-set size, including a single subject's handful of samples."""
    reference = np.sort(np.asarray(holdout_losses, dtype=np.float64))
    forget = np.asarray(forget_losses, dtype=np.float64)
    if len(forget) == 0 or len(reference) == 0:
        raise ValueError("the KS test needs forget and holdout losses")
    below = np.searchsorted(reference, forget, side="left")
    at_or_below = np.searchsorted(reference, forget, side="right")
    # mid-rank percentile; the +1 keeps it strictly inside (0, 1) so ties cannot fake a signal
    percentiles = (below + 0.5 * (at_or_below - below) + 0.5) / (len(reference) + 1)
    result = stats.kstest(percentiles, "uniform")
    return KSResult(statistic=float(result.statistic), p_value=float(result.pvalue),
                    n=len(forget), n_reference=len(reference))
