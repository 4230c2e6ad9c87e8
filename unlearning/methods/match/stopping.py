"""When match stops: a check every few steps asks whether the forget set can still be told
from data the model never saw, on ``unseen_stop``, a part of ``unseen`` that is never matched
against (so the rule cannot be satisfied by overfitting the slice it is judged on). Which
question a check asks depends on the task:

* ``label-rate`` (class, backdoor): at most ``max_label_rate`` of the forget check and of its
  unseen counterpart (holdout images of the class; triggered holdout images) get the label.
* ``per-sample`` (a subset with reference statistics): each forget sample scored against its
  own expected never-seen value, ``(phi - expected) / spread``, and unseen_stop's samples
  scored the same way; blind when the forget set's mean score is within
  ``per_sample_tolerance`` of unseen_stop's and its share above unseen_stop's 95th percentile
  (the memorised tail) within ``per_sample_tail_tolerance`` of 5 %. (A KS test of the two
  sets of scores was too strict: on the tests' world a retrain itself read p = 0.06.) The
  method's half of the references only: the gate's half is never read here.
* ``population`` (a subset of ``min_population`` samples and more, without references): the
  verifier's population attack, blind within ``tolerance`` of 0.5.
* ``ks`` (a smaller subset without references): the verifier's KS test on the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearning.loops import SampleSet
from unlearning.methods.match.config import MatchConfig
from unlearning.methods.match.head import HeadCache
from unlearning.methods.match.statistics import PerSampleTargets, label_statistic
from unlearning.verification.mia import (
    attack_features,
    ks_forget_test,
    per_sample_loss,
    population_mia,
)


def _rate(logits: torch.Tensor, samples: SampleSet) -> float:
    return float((logits.argmax(1).cpu() == samples.y.cpu()).float().mean()) \
        if len(samples) else 0.0


@dataclass
class StoppingRule:
    """The fixed sets a check reads and the question it asks (``kind``)."""

    config: MatchConfig
    cache: HeadCache
    forget_check: SampleSet
    forget_check_positions: torch.Tensor  # positions of forget_check in the forget set
    unseen_stop: SampleSet  # relabelled for class and backdoor
    stop_true_labels: torch.Tensor  # unseen_stop's true labels, for the utility veto
    counterpart: SampleSet | None  # class, backdoor
    per_sample: PerSampleTargets | None
    seed: int

    @property
    def kind(self) -> str:
        if self.counterpart is not None:
            return "label-rate"
        if self.per_sample is not None:
            return "per-sample"
        return "population" if len(self.forget_check) >= self.config.min_population else "ks"

    @property
    def sets(self) -> list[SampleSet]:
        return [self.forget_check, self.unseen_stop] + \
            ([self.counterpart] if self.counterpart is not None else [])

    @property
    def tolerance(self) -> float | None:
        """The attack gap a ``population`` check must close to (None for the others, whose
        checks are never spaced out)."""
        return self.config.tolerance if self.kind == "population" else None

    def check(self) -> dict[str, float]:
        """``gap``: how far from blind (attack accuracy - 0.5; the KS statistic; the forgotten
        label's hit rate); ``blind``: 1.0 when this check alone says the attack is;
        ``holdout_accuracy``: unseen_stop's accuracy (the key results carry)."""
        config = self.config
        forget_logits = self.cache.logits(self.forget_check)
        stop_logits = self.cache.logits(self.unseen_stop)
        accuracy = float((stop_logits.argmax(1) == self.stop_true_labels).float().mean())
        kind = self.kind
        if kind == "label-rate":
            assert self.counterpart is not None
            rate = max(_rate(forget_logits, self.forget_check),
                       _rate(self.cache.logits(self.counterpart), self.counterpart))
            return {"label_rate": rate, "gap": rate, "blind": float(rate <= config.max_label_rate),
                    "holdout_accuracy": accuracy}
        forget_y, stop_y = self.forget_check.y.cpu(), self.unseen_stop.y.cpu()
        if kind == "per-sample":
            assert self.per_sample is not None
            targets = self.per_sample
            forget_scores = targets.scores(
                label_statistic(forget_logits, forget_y, "confidence"),
                targets.forget_expected[self.forget_check_positions.cpu()])
            stop_scores = targets.scores(label_statistic(stop_logits, stop_y, "confidence"),
                                         targets.stop_expected)
            # blind: the forget set's mean score within ``per_sample_tolerance`` of
            # unseen_stop's, and no more of it above unseen_stop's 95th percentile than
            # ``0.05 + per_sample_tail_tolerance``
            mean_gap = float(forget_scores.mean() - stop_scores.mean())
            tail = float((forget_scores > torch.quantile(stop_scores, 0.95)).float().mean())
            gap = max(abs(mean_gap), tail - 0.05)
            blind = abs(mean_gap) <= config.per_sample_tolerance \
                and tail <= 0.05 + config.per_sample_tail_tolerance
            return {"mean_score_gap": mean_gap, "tail_share": tail, "gap": gap,
                    "blind": float(blind), "holdout_accuracy": accuracy}
        if kind == "population":
            attack = population_mia(
                attack_features(forget_logits, forget_y, config.attack_features),
                attack_features(stop_logits, stop_y, config.attack_features), seed=self.seed)
            gap = abs(attack.accuracy - 0.5)
            return {"attack_accuracy": attack.accuracy, "attack_auc": attack.auc,
                    "gap": gap, "blind": float(gap <= config.tolerance),
                    "holdout_accuracy": accuracy}
        ks = ks_forget_test(per_sample_loss(forget_logits, forget_y),
                            per_sample_loss(stop_logits, stop_y))
        return {"ks_p_value": ks.p_value, "gap": ks.statistic,
                "blind": float(ks.p_value >= config.ks_stop_p_value),
                "holdout_accuracy": accuracy}


def steps_to_next_check(history: list[dict[str, float]], config: MatchConfig, *,
                        tolerance: float | None) -> int:
    """``check_every``, unless the attack's gap is closing so slowly that, at its mean rate
    since the start, reaching ``tolerance`` is more than two intervals away: then half the
    projected distance, in whole intervals, at most ``max_check_every``. ``tolerance`` None
    (the KS tests, the label-rate checks): always ``check_every``."""
    first, last = history[0], history[-1]
    if tolerance is None or last["step"] <= 0 or last["gap"] <= tolerance:
        return config.check_every
    rate = (first["gap"] - last["gap"]) / last["step"]
    if rate <= 0:
        return config.check_every
    half_way = (last["gap"] - tolerance) / rate / 2
    intervals = max(1, int(half_way // config.check_every))
    return min(intervals * config.check_every, max(config.max_check_every, config.check_every))
