"""The numbers every run is judged by: retain / forget / test accuracy, the population attack
on the forget set, attack success rate, and the comparisons with retraining (RetDev, RTE)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unlearning.loops import SampleSet, evaluate, predict_logits
from unlearning.scenarios import Scenario, attack_success_rate
from unlearning.verification.mia import MIAResult, attack_features, population_mia

# Below this retrain value a ratio is meaningless (class and backdoor forget accuracy are ~0
# after retraining): RetDev then uses the absolute difference for that term.
RETDEV_RATIO_FLOOR = 0.1


def forget_mia(model: nn.Module, forget: SampleSet, audit: SampleSet, scenario: Scenario,
               device: torch.device, *, feature_set: str = "loss", seed: int = 0) -> MIAResult:
    """Population attack: the forget set against its unseen counterpart in ``audit``."""
    counterpart = scenario.unseen_counterpart(audit)
    members = attack_features(predict_logits(model, forget, device), forget.y.cpu(),
                              feature_set)
    nonmembers = attack_features(predict_logits(model, counterpart, device),
                                 counterpart.y.cpu(), feature_set)
    return population_mia(members, nonmembers, seed=seed)


def utility_test_set(test: SampleSet, scenario: Scenario) -> SampleSet:
    """Test data the model should still get right: all of it, minus the forgotten class."""
    if scenario.kind != "class":
        return test
    return test.subset(torch.nonzero(torch.ne(test.y, scenario.class_label)).flatten())


def scenario_metrics(model: nn.Module, *, forget: SampleSet, retain: SampleSet,
                     test: SampleSet, audit: SampleSet, scenario: Scenario,
                     device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Flat metrics of one model in one scenario (JSON-ready), named as the verification
    report's summary names them: ``test_accuracy`` excludes a forgotten class, which gets its
    own ``forget_class_accuracy``; ``attack_success_rate`` is None outside the backdoor
    scenario."""
    mia = forget_mia(model, forget, audit, scenario, device, seed=seed)
    metrics: dict[str, Any] = {
        "retain_accuracy": evaluate(model, retain, device)["accuracy"],
        "forget_accuracy": evaluate(model, forget, device)["accuracy"],
        "test_accuracy": evaluate(model, utility_test_set(test, scenario), device)["accuracy"],
        "mia_accuracy": mia.accuracy,
        "mia_auc": mia.auc,
        "mia_ci95": [mia.ci_low, mia.ci_high],
        "mia_n": mia.n_members,
        "attack_success_rate": None,
    }
    if scenario.kind == "class":
        forgotten = test.subset(torch.nonzero(torch.eq(test.y, scenario.class_label)).flatten())
        metrics["forget_class_accuracy"] = evaluate(model, forgotten, device)["accuracy"]
    if scenario.kind == "backdoor" and scenario.trigger is not None:
        metrics["attack_success_rate"] = attack_success_rate(model, test, scenario.trigger,
                                             int(scenario.target_label), device)  # type: ignore[arg-type]
    return metrics


# The lab's names before they were unified with the report's (result files written earlier
# are read through :func:`current_names`).
LEGACY_METRIC_NAMES = {"retain_acc": "retain_accuracy", "forget_acc": "forget_accuracy",
                       "test_acc": "test_accuracy", "asr": "attack_success_rate",
                       "forget_class_test_acc": "forget_class_accuracy", "mia_ci": "mia_ci95"}


def current_names(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with legacy metric names renamed (new names win where both exist)."""
    renamed = {LEGACY_METRIC_NAMES.get(k, k): v for k, v in row.items()
               if k not in LEGACY_METRIC_NAMES}
    for old, new in LEGACY_METRIC_NAMES.items():
        if old in row:
            renamed.setdefault(new, row[old])
    return renamed


def retdev(run: dict[str, Any], retrain: dict[str, Any]) -> float:
    """abs(RA/RA_R - 1) + abs(FA/FA_R - 1) + abs(TA/TA_R - 1); a term whose retrain value is
    below ``RETDEV_RATIO_FLOOR`` uses abs(X - X_R) instead of the undefined ratio."""
    total = 0.0
    for key in ("retain_accuracy", "forget_accuracy", "test_accuracy"):
        value, reference = float(run[key]), float(retrain[key])
        total += abs(value / reference - 1.0) if reference >= RETDEV_RATIO_FLOOR \
            else abs(value - reference)
    return total


def rte(retrain_seconds: float, method_seconds: float) -> float:
    """Run-time efficiency: how many times faster than retraining."""
    return retrain_seconds / max(method_seconds, 1e-9)
