"""The verification report a candidate model gets, and the gate that reads it.

:func:`build_verification_report` attacks the candidate (and, for comparison, its base
version) and measures utility and the scenario's own target; it returns plain JSON types so
the worker can store it as is. :func:`decide` compares a report with :class:`Thresholds` and
returns every reason it fails, so a rejection says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearning.loops import SampleSet, evaluate, predict_logits
from unlearning.scenarios import Scenario, attack_success_rate
from unlearning.verification.metrics import forget_mia, utility_test_set
from unlearning.verification.mia import ks_forget_test, per_sample_loss

REPORT_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must reach to be published. ``min_population``: below this many
    forget samples the population attack says nothing and the KS test decides membership;
    ``ks_below``: below this many, the KS test applies as well (from 50 to 200 samples the
    attack's accuracy is too noisy to refuse an unchanged model reliably on its own). From
    ``ks_below`` up, the attack decides alone: the KS test's power there flags tail
    differences no attack acting on the population exploits (class forgetting by match:
    attack 0.52, KS p = 1e-11)."""

    min_indiscernibility: float = 0.9
    max_test_accuracy_drop: float = 0.02
    max_retain_accuracy_drop: float | None = None
    max_forget_class_accuracy: float = 0.05
    max_attack_success_rate: float = 0.10
    min_ks_p_value: float = 0.01
    min_population: int = 50
    ks_below: int = 200

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accuracy(model: nn.Module, samples: SampleSet, device: torch.device) -> float:
    return evaluate(model, samples, device)["accuracy"]


def build_verification_report(candidate: nn.Module, base: nn.Module, *, forget: SampleSet,
                              holdout: SampleSet, test: SampleSet, scenario: Scenario,
                              device: torch.device, retain: SampleSet | None = None,
                              seed: int = 0) -> dict[str, Any]:
    """Everything the gate needs about ``candidate``, with the same numbers for ``base`` (the
    version it was derived from) where a comparison says how much signal was removed.

    ``holdout``: unseen data not used by the unlearning method (the audit slice);
    ``retain``: optional retain sample, for the retain-accuracy check."""
    n_forget = len(forget)
    report: dict[str, Any] = {"version": REPORT_VERSION, "scenario": scenario.to_dict(),
                              "n_forget": n_forget}
    unseen = scenario.unseen_counterpart(holdout)
    if n_forget >= 10 and len(unseen) >= 10:
        report["mia"] = {
            "feature_set": "loss",
            "candidate": forget_mia(candidate, forget, holdout, scenario, device,
                                    seed=seed).to_dict(),
            "base": forget_mia(base, forget, holdout, scenario, device, seed=seed).to_dict(),
            "candidate_strong": forget_mia(candidate, forget, holdout, scenario, device,
                                           feature_set="strong", seed=seed).to_dict(),
        }
    else:
        report["mia"] = None
    if len(unseen):
        forget_losses = per_sample_loss(predict_logits(candidate, forget, device), forget.y.cpu())
        unseen_losses = per_sample_loss(predict_logits(candidate, unseen, device), unseen.y.cpu())
        report["ks"] = ks_forget_test(forget_losses, unseen_losses).to_dict()
    else:
        report["ks"] = None
    utility = utility_test_set(test, scenario)
    test_candidate, test_base = _accuracy(candidate, utility, device), _accuracy(base, utility,
                                                                               device)
    report["utility"] = {"test_accuracy": test_candidate, "base_test_accuracy": test_base,
                         "test_accuracy_drop": test_base - test_candidate, "n_test": len(utility)}
    if retain is not None and len(retain):
        retain_candidate, retain_base = (_accuracy(candidate, retain, device),
                                         _accuracy(base, retain, device))
        report["utility"].update({"retain_accuracy": retain_candidate,
                                  "base_retain_accuracy": retain_base,
                                  "retain_accuracy_drop": retain_base - retain_candidate})
    report["forget_accuracy"] = _accuracy(candidate, forget, device)
    if scenario.kind == "class":
        forgotten = test.subset(torch.nonzero(test.y == scenario.forget_class).flatten())
        report["class"] = {"forget_class": scenario.forget_class,
                           "forget_class_accuracy": _accuracy(candidate, forgotten, device),
                           "base_forget_class_accuracy": _accuracy(base, forgotten, device),
                           "n": len(forgotten)}
    if scenario.kind == "backdoor":
        report["backdoor"] = None if scenario.trigger is None else {
            "target_label": scenario.target_label,
            "attack_success_rate": attack_success_rate(candidate, test, scenario.trigger,
                                                       int(scenario.target_label), device),  # type: ignore[arg-type]
            "base_attack_success_rate": attack_success_rate(base, test, scenario.trigger,
                                                            int(scenario.target_label), device),  # type: ignore[arg-type]
        }
    return _plain(report)


def _plain(value: Any) -> Any:
    """NumPy scalars and tuples to plain JSON types, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def decide(report: dict[str, Any], thresholds: Thresholds | None = None) -> GateDecision:
    """Pass only if every applicable check passes; list every failed one."""
    limits = thresholds or Thresholds()
    failures: list[str] = []
    population = report.get("mia") is not None and report["n_forget"] >= limits.min_population
    if population:
        mia = report["mia"]["candidate"]
        if mia["indiscernibility"] < limits.min_indiscernibility:
            failures.append(f"membership attack accuracy {mia['accuracy']:.3f} "
                            f"(n={mia['n_members']}) gives indiscernibility "
                            f"{mia['indiscernibility']:.3f} < {limits.min_indiscernibility}")
    # The KS test: the only membership check for a small forget set, and a second one where
    # the population attack is still noisy.
    if report.get("ks") is None:
        if not population:
            failures.append("no unseen reference data to verify against")
    elif population and report["n_forget"] >= limits.ks_below:
        pass
    elif report["ks"]["p_value"] < limits.min_ks_p_value:
        failures.append(f"KS test: forget losses do not look unseen "
                        f"(p={report['ks']['p_value']:.3g}, n={report['ks']['n']}) < "
                        f"{limits.min_ks_p_value}")
    utility = report["utility"]
    if utility["test_accuracy_drop"] > limits.max_test_accuracy_drop:
        failures.append(f"test accuracy dropped by {utility['test_accuracy_drop']:.3f} > "
                        f"{limits.max_test_accuracy_drop}")
    if limits.max_retain_accuracy_drop is not None and "retain_accuracy_drop" in utility \
            and utility["retain_accuracy_drop"] > limits.max_retain_accuracy_drop:
        failures.append(f"retain accuracy dropped by {utility['retain_accuracy_drop']:.3f} > "
                        f"{limits.max_retain_accuracy_drop}")
    if "class" in report and report["class"]["forget_class_accuracy"] > \
            limits.max_forget_class_accuracy:
        failures.append(f"forgotten class still recognised: accuracy "
                        f"{report['class']['forget_class_accuracy']:.3f} > "
                        f"{limits.max_forget_class_accuracy}")
    if report.get("backdoor"):
        asr = report["backdoor"]["attack_success_rate"]
        if asr > limits.max_attack_success_rate:
            failures.append(f"backdoor still works: attack success rate {asr:.3f} > "
                            f"{limits.max_attack_success_rate}")
    return GateDecision(passed=not failures, failures=failures)
