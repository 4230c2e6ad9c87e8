"""match's settings, and how ``auto`` fields resolve for a given task. Why each default is what
it is, with the runs that chose it: unlearning/README.md, "match: design" and "match:
measurement history"."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from unlearning.methods.base import MethodConfig
from unlearning.methods.match.head import classifier_head


@dataclass(frozen=True)
class MatchConfig(MethodConfig):
    # What is matched. on: per sample when the task carries reference statistics (each forget
    # sample's score against its own expected never-seen value, matched to unseen data's
    # scores); off: by distribution. Off by default: on the tests' overfit world the
    # per-sample pull ran to its budget and left more memorised samples than the
    # distribution's (unlearning/README.md, "Per-sample matching").
    per_sample: str = "off"  # on | off
    # The distribution's statistic. auto: by the size of a subset forget set: the probability
    # of the label below ``loss_statistic_from`` samples, the loss from there, the margin loss
    # softplus(margin - c) from ``margin_statistic_from``; the probability for class and
    # backdoor (a label the model must stop giving).
    statistic: str = "auto"  # auto | loss | probability | confidence | margin
    statistic_margin: float = 2.0  # the margin statistic's margin, in logit units
    loss_statistic_from: int = 200
    margin_statistic_from: int = 2000
    target: str = "original"  # original | current: whose view of unseen data is the target
    distance: str = "w1"  # w1 | w2 | huber
    match_weight: float = 1.0
    retain_weight: float = 1.0
    distill_weight: float = 1.0
    anchor_weight: float = 1.0
    anchor_loss: str = "kl"  # kl | statistic
    anchor_statistic: str | None = None  # statistic the anchor holds; None: the matched one
    optimizer: str = "sgd"  # sgd | adam
    # auto: only the classifier head when it holds at least ``head_share`` of the parameters
    # (cnn-small's dense layers: 96 %), else all
    trainable: str = "auto"  # auto | all | head
    head_share: float = 0.5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    forget_batch_size: int = 128
    retain_batch_size: int = 128
    # batches from unseen_match (the name predates the slice's; policies store it)
    reference_batch_size: int | None = None  # None: forget_batch_size
    max_steps: int = 400
    check_every: int = 10
    # while blind is far off (the attack's gap closing slowly), checks are spaced out up to
    # this many steps; near the tolerance, every check_every
    max_check_every: int = 40
    # None: by the forget set's size: 2 000 forget samples against 70 % of ``unseen`` from
    # ``margin_statistic_from`` samples, else 1 000 against half
    check_size: int | None = None
    attack_features: str = "loss"
    tolerance: float = 0.01  # blind: the population attack within this of 0.5
    patience: int = 2
    # the veto reads accuracy on unseen_stop (about 500 images: +-0.015 of noise); the
    # gate's own utility check on the test set is the binding one
    max_accuracy_drop: float = 0.03
    max_grad_norm: float | None = 5.0  # gradient-norm clip; None turns it off
    min_population: int = 50  # below, the KS test judges instead of the population attack
    # the KS test's p-value at which a check says blind (small sets; per sample: the forget
    # set's scores against unseen_stop's)
    ks_stop_p_value: float = 0.2
    # class and backdoor: blind when at most this share of the forget check and of its unseen
    # counterpart (holdout images of the class; triggered holdout images) get the label
    max_label_rate: float = 0.05
    # per sample: blind when the forget set's mean score is within this many spreads of
    # unseen_stop's, and its share above unseen_stop's 95th percentile within the tail
    # tolerance of 5 % (a retrain on the tests' world: gap 0.03, share 3.2 %)
    per_sample_tolerance: float = 0.1
    per_sample_tail_tolerance: float = 0.02
    stopping_fraction: float | None = None

    budget_fields = ("max_steps",)

    def stronger(self, factor: float = 2.0) -> MatchConfig:
        """Escalation: a larger step budget, a stronger pull towards unseen statistics and a
        stricter attack (multi-feature) in the stopping rule."""
        return MatchConfig(**{**self.to_dict(), "max_steps": int(self.max_steps * factor),
                              "match_weight": self.match_weight * factor,
                              "attack_features": "strong"})


def resolve_statistic(config: MatchConfig, subset_size: int | None) -> str:
    """The statistic ``auto`` stands for: by the size of a subset forget set; ``None`` (class,
    backdoor: a label the model should stop giving) takes the bounded probability."""
    if config.statistic != "auto":
        return config.statistic
    n = subset_size or 0
    return ("margin" if n >= config.margin_statistic_from else
            "loss" if n >= config.loss_statistic_from else "probability")


def resolve_stopping(config: MatchConfig, subset_size: int | None) -> MatchConfig:
    """``config`` with the stopping rule's ``None`` fields filled in by the size of a subset
    forget set (``None``: class and backdoor, judged by label rates)."""
    large = subset_size is not None and subset_size >= config.margin_statistic_from
    return replace(config,
                   check_size=config.check_size or (2000 if large else 1000),
                   stopping_fraction=config.stopping_fraction or (0.7 if large else 0.5))


def resolve_trainable(config: MatchConfig, model: nn.Module) -> str:
    """The parameters ``trainable="auto"`` stands for: ``head`` when the classifier head holds
    at least ``head_share`` of them (where a model's memory is), else ``all``."""
    if config.trainable not in ("auto", "all", "head"):
        raise ValueError(f"unknown trainable {config.trainable!r}")
    if config.trainable != "auto":
        return config.trainable
    head = sum(p.numel() for p in classifier_head(model).parameters())
    return "head" if head >= config.head_share * sum(p.numel() for p in model.parameters()) \
        else "all"
