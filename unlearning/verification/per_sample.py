"""The per-request membership test (docs/methods.md, 'Per-sample test'): does a request's
handful of samples still look like members of the candidate, judged sample by sample against
reference models that never trained on them?

For each sample, ``score = (phi_candidate - mean of its OUT references) / spread``, with
``phi`` the logit-scaled true-class confidence. The spread is pooled over all samples ("fixed
variance" offline LiRA) by default: with 2 to 8 OUT values per sample a per-sample spread is
too noisy to divide by, and measurement (benchmarks/gate_power.py, k=16, 200 subjects) found
it no better across worlds: 20.5 % of subjects flagged against the pooled 17.0 % on the demo
world, 7.5 % against 13.5 % on 6 000 training images. The null is empirical: holdout samples,
which no model trained on, scored the same way under the same candidate. That absorbs
everything the candidate does to unseen data (the references train on half the data, the
candidate was fine-tuned), so a request's p-value is the share of same-size random groups of
holdout samples whose mean score reaches its own. Across a batch's requests,
Benjamini-Hochberg at ``alpha`` decides which still look like members. Each result carries its
power: the smallest mean shift the test detects at ``alpha`` with 80 % probability, from the
null's spread at that group size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

MIN_OUT = 2  # fewer OUT references than this: the sample is "not testable"
NULL_DRAWS = 20_000
NORMAL_ABOVE = 100  # group sizes from which the null of a group mean is taken as normal
POWER = 0.8
SPREADS = ("pooled", "per-sample")


def pooled_spread(out: np.ndarray) -> float:
    """Standard deviation of OUT values around their per-sample means, pooled over samples
    (``out``: ``[references, samples]``, NaN where missing)."""
    counts = np.sum(~np.isnan(out), axis=0)
    usable = counts >= 2
    if not usable.any():
        return 1.0
    centred = out[:, usable] - np.nanmean(out[:, usable], axis=0)
    dof = float(np.sum(counts[usable] - 1))
    return max(float(math.sqrt(np.nansum(centred ** 2) / dof)), 1e-6)


def score(phi: np.ndarray, out: np.ndarray, *, spread: str = "pooled",
          pooled: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample scores and a testable mask: NaN (not testable) where fewer than
    :data:`MIN_OUT` OUT values exist. ``pooled`` divides by the spread pooled over samples
    (``pooled``, or :func:`pooled_spread` of ``out``); ``per-sample`` by each sample's own
    spread, floored at the 10th percentile of the testable samples' own spreads."""
    counts = np.sum(~np.isnan(out), axis=0)
    testable = counts >= MIN_OUT
    result = np.full(len(phi), np.nan)
    if not testable.any():
        return result, testable
    mean = np.nanmean(out[:, testable], axis=0)
    sigma = pooled if pooled is not None else pooled_spread(out)
    if spread == "per-sample":
        own = np.nanstd(out[:, testable], axis=0, ddof=1)
        floor = max(float(np.quantile(own, 0.1)), 1e-6)
        divisor: np.ndarray | float = np.maximum(own, floor)
    elif spread == "pooled":
        divisor = sigma
    else:
        raise ValueError(f"unknown spread {spread!r}; choose from {SPREADS}")
    result[testable] = (phi[testable] - mean) / divisor
    return result, testable


@dataclass(frozen=True)
class GroupNull:
    """The distribution of the mean score of ``n`` random holdout samples."""

    n: int
    means: np.ndarray | None  # empirical draws; None: normal with ``sd``
    mu: float
    sd: float

    def p_value(self, observed: float) -> float:
        """One-sided: how often a group of unseen samples scores at least ``observed``."""
        if self.means is None:
            return float(stats.norm.sf(observed, loc=self.mu, scale=self.sd))
        return float((1 + np.sum(self.means >= observed)) / (1 + len(self.means)))

    def detectable_shift(self, alpha: float, power: float = POWER) -> float:
        """Smallest mean shift (in score units) detected with probability ``power``."""
        if self.means is None:
            return float(self.sd * (stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)))
        return float(np.quantile(self.means, 1 - alpha) - np.quantile(self.means, 1 - power))


def group_null(null_scores: np.ndarray, n: int, *, seed: int = 0,
               draws: int = NULL_DRAWS) -> GroupNull:
    """Means of ``draws`` random groups of ``n`` holdout scores (without replacement), or
    the normal approximation for ``n`` above :data:`NORMAL_ABOVE`."""
    scores = null_scores[~np.isnan(null_scores)]
    if len(scores) < 2:
        raise ValueError("the null needs at least 2 scored holdout samples")
    mu, sd = float(scores.mean()), float(scores.std(ddof=1))
    if n > NORMAL_ABOVE or n >= len(scores):
        finite = math.sqrt(max(len(scores) - n, 1) / max(len(scores) - 1, 1))
        return GroupNull(n, None, mu, sd / math.sqrt(n) * finite)
    rng = np.random.default_rng([seed, n])
    keys = rng.random((draws, len(scores)))
    picks = np.argpartition(keys, n, axis=1)[:, :n]
    return GroupNull(n, scores[picks].mean(axis=1), mu, sd / math.sqrt(n))


def benjamini_hochberg(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Which hypotheses BH rejects at false-discovery rate ``alpha``."""
    m = len(p_values)
    if m == 0:
        return []
    order = np.argsort(p_values)
    ranked = np.asarray(p_values)[order]
    below = ranked <= alpha * np.arange(1, m + 1) / m
    cut = int(np.max(np.flatnonzero(below))) + 1 if below.any() else 0
    rejected = np.zeros(m, dtype=bool)
    rejected[order[:cut]] = True
    return rejected.tolist()


@dataclass(frozen=True)
class RequestEvidence:
    """One request's per-sample result. ``flagged``: still looks like a member after BH;
    ``p_before``/``flagged_before``: the same test on the base version (signal before)."""

    request_id: str
    n: int  # forget samples of the request in the model's training data
    n_testable: int
    mean_score: float | None
    p_value: float | None
    flagged: bool
    mean_score_before: float | None
    p_before: float | None
    flagged_before: bool
    detectable_shift: float | None

    @property
    def testable(self) -> bool:
        return self.n_testable > 0


@dataclass(frozen=True)
class PerSampleEvidence:
    """The per-request test over a batch, with what it rests on."""

    requests: list[RequestEvidence]
    references: int  # OUT references per sample in the half the gate reads
    reference_models: int  # models in that half
    alpha: float
    spread: str
    pooled_spread: float
    n_null: int  # holdout samples that form the null
    reference_set: int | None = None

    @property
    def n_flagged(self) -> int:
        return sum(r.flagged for r in self.requests)

    @property
    def n_flagged_before(self) -> int:
        return sum(r.flagged_before for r in self.requests)

    @property
    def n_not_testable(self) -> int:
        """Samples without enough OUT references, over all requests."""
        return sum(r.n - r.n_testable for r in self.requests)

    def for_request(self, request_id: str) -> RequestEvidence | None:
        return next((r for r in self.requests if r.request_id == request_id), None)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.update(n_flagged=self.n_flagged, n_flagged_before=self.n_flagged_before,
                    n_not_testable=self.n_not_testable)
        return body

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> PerSampleEvidence:
        fields = {k: v for k, v in body.items()
                  if k not in ("n_flagged", "n_flagged_before", "n_not_testable")}
        fields["requests"] = [RequestEvidence(**r) for r in body.get("requests", [])]
        return cls(**fields)


def per_request_test(
    *, candidate_phi: np.ndarray, base_phi: np.ndarray, forget_out: np.ndarray,
    holdout_candidate_phi: np.ndarray, holdout_base_phi: np.ndarray, holdout_out: np.ndarray,
    request_of: Sequence[str], alpha: float, spread: str = "pooled", seed: int = 0,
    reference_set: int | None = None,
) -> PerSampleEvidence:
    """Score each forget sample under the candidate and the base against its OUT values
    (``forget_out [h, n_forget]``), build the null from the holdout scored the same way, and
    test each request (``request_of[i]``: the request forget sample ``i`` belongs to)."""
    if len(request_of) != len(candidate_phi):
        raise ValueError("request_of must name a request for every forget sample")
    sigma = pooled_spread(np.concatenate([forget_out, holdout_out], axis=1))

    def scored(phi: np.ndarray, holdout_phi: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        forget_scores, testable = score(phi, forget_out, spread=spread, pooled=sigma)
        null_scores, _ = score(holdout_phi, holdout_out, spread=spread, pooled=sigma)
        return forget_scores, testable, null_scores

    after, testable, null_after = scored(candidate_phi, holdout_candidate_phi)
    before, _, null_before = scored(base_phi, holdout_base_phi)
    ids = list(dict.fromkeys(request_of))
    members = {rid: np.array([i for i, r in enumerate(request_of) if r == rid]) for rid in ids}
    # (request, n, n testable, mean after, p after, mean before, p before, detectable
    # shift); the figures are None when no sample of the request is testable
    rows: list[tuple[str, int, int, float | None, float | None, float | None,
                     float | None, float | None]] = []
    for rid in ids:
        index = members[rid]
        usable = index[testable[index]]
        if len(usable) == 0:
            rows.append((rid, len(index), 0, None, None, None, None, None))
            continue
        n = len(usable)
        null_a = group_null(null_after, n, seed=seed)
        null_b = group_null(null_before, n, seed=seed + 1)
        mean_a, mean_b = float(after[usable].mean()), float(before[usable].mean())
        rows.append((rid, len(index), n, mean_a, null_a.p_value(mean_a), mean_b,
                     null_b.p_value(mean_b), null_a.detectable_shift(alpha)))
    tested = [(r[0], r[4], r[6]) for r in rows if r[4] is not None and r[6] is not None]
    flags_after = dict(zip([t[0] for t in tested],
                           benjamini_hochberg([t[1] for t in tested], alpha), strict=True))
    flags_before = dict(zip([t[0] for t in tested],
                            benjamini_hochberg([t[2] for t in tested], alpha), strict=True))
    requests = [RequestEvidence(
        request_id=rid, n=n, n_testable=n_testable, mean_score=mean_a, p_value=p_a,
        flagged=flags_after.get(rid, False), mean_score_before=mean_b, p_before=p_b,
        flagged_before=flags_before.get(rid, False), detectable_shift=shift)
        for rid, n, n_testable, mean_a, p_a, mean_b, p_b, shift in rows]
    out_counts = np.sum(~np.isnan(forget_out), axis=0)
    return PerSampleEvidence(
        requests=requests,
        references=int(np.median(out_counts)) if len(out_counts) else 0,
        reference_models=int(forget_out.shape[0]), alpha=alpha, spread=spread,
        pooled_spread=sigma, n_null=int(np.sum(~np.isnan(null_after))),
        reference_set=reference_set)
