"""The verification report a candidate model gets, and the gate that reads it.

:func:`build_verification_report` attacks the candidate (and, for comparison, its base
version), runs the per-request test when reference statistics are given, and measures utility
and the scenario's own target; it returns a typed :class:`VerificationReport`, which the worker
stores through :meth:`VerificationReport.to_dict`. :func:`decide` compares a report with
:class:`Thresholds` and records every reason it fails, so a rejection says why.

Which evidence backed a decision is part of the report: ``per-sample`` when the per-request
test ran (its figures in ``per_sample``), ``population-only`` when the model has no reference
statistics (then only the population attack and the KS test spoke, with little power on a
handful of samples), ``none-needed`` when no training sample was covered. ``outcome`` says
whether the weights changed: ``unchanged`` means the served version already behaves like one
that never saw the samples, and is never called an unlearned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearning.loops import SampleSet, evaluate, predict_logits
from unlearning.scenarios import Scenario, attack_success_rate
from unlearning.verification.metrics import forget_mia, utility_test_set
from unlearning.verification.mia import ks_forget_test, per_sample_loss
from unlearning.verification.per_sample import PerSampleEvidence, per_request_test
from unlearning.verification.references import sample_phi

REPORT_VERSION = 2
PER_SAMPLE, POPULATION_ONLY, NONE_NEEDED = "per-sample", "population-only", "none-needed"
UNLEARNED, UNCHANGED = "unlearned", "unchanged"


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must reach to be published; the field names are the policy's
    (``VerificationPolicy``). ``min_population``: below this many forget samples the
    population attack says nothing and the KS test decides membership; ``ks_below``: below
    this many, the KS test applies as well. ``alpha``: the per-request test's false-discovery
    rate across a batch's requests."""

    min_indiscernibility: float = 0.9
    max_test_accuracy_drop: float = 0.02
    max_retain_accuracy_drop: float | None = None
    max_forget_class_accuracy: float = 0.05
    max_attack_success_rate: float = 0.10
    min_ks_p_value: float = 0.01
    alpha: float = 0.05
    min_population: int = 50
    ks_below: int = 200

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def threshold_names() -> set[str]:
    return {f.name for f in fields(Thresholds)}


@dataclass(frozen=True)
class MethodRun:
    """What the unlearning method did: its steps, and the sha256 of the tensors (not of the
    file, whose header carries job metadata) before and after."""

    method: str
    escalation_level: int
    steps: int
    seconds: float
    parent_tensor_sha256: str
    tensor_sha256: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_changed(self) -> bool:
        return self.parent_tensor_sha256 != self.tensor_sha256


@dataclass(frozen=True)
class GateReferences:
    """The gate half of a reference set, for a job's forget and ``audit`` samples
    (``holdout_out``: the audit slice's): ``[h, n]`` OUT values (NaN where none), and which
    request each forget sample belongs to."""

    forget_out: np.ndarray
    holdout_out: np.ndarray
    request_of: Sequence[str]
    reference_set: int | None = None


@dataclass
class VerificationReport:
    scenario: dict[str, Any]
    n_forget: int
    mia: dict[str, Any] | None = None
    ks: dict[str, Any] | None = None
    utility: dict[str, Any] = field(default_factory=dict)
    forget_accuracy: float | None = None
    class_check: dict[str, Any] | None = None
    backdoor: dict[str, Any] | None = None
    per_sample: PerSampleEvidence | None = None
    per_sample_note: str | None = None  # why there is no per-sample test, when there is none
    run: MethodRun | None = None
    thresholds: Thresholds | None = None
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def evidence(self) -> str:
        if self.n_forget == 0:
            return NONE_NEEDED
        return PER_SAMPLE if self.per_sample is not None else POPULATION_ONLY

    @property
    def outcome(self) -> str:
        if self.n_forget == 0 or (self.run is not None and not self.run.weights_changed):
            return UNCHANGED
        return UNLEARNED

    def reasons_for(self, request_id: str) -> list[str]:
        """The failures a requester may see: its own, and those not about any request."""
        return [r for r in self.reasons
                if not r.startswith("request ") or r.startswith(f"request {request_id}:")]

    def summary(self) -> dict[str, Any]:
        """The flat figures a version records as metrics and a certificate repeats."""
        flat: dict[str, Any] = {"passed": self.passed, "n_forget": self.n_forget,
                                "evidence": self.evidence, "outcome": self.outcome}
        if self.run is not None:
            flat.update(method=self.run.method, escalation_level=self.run.escalation_level,
                        method_steps=self.run.steps, weights_changed=self.run.weights_changed)
        if self.mia:
            candidate, base = self.mia["candidate"], self.mia["base"]
            flat.update(mia_accuracy=candidate["accuracy"], mia_auc=candidate["auc"],
                        mia_ci95=[candidate["ci_low"], candidate["ci_high"]],
                        mia_n=candidate["n_members"],
                        indiscernibility=candidate["indiscernibility"],
                        base_mia_accuracy=base["accuracy"])
        if self.ks:
            flat["ks_p_value"] = self.ks["p_value"]
        if self.utility:
            flat.update(test_accuracy=self.utility["test_accuracy"],
                        base_test_accuracy=self.utility["base_test_accuracy"])
            if "retain_accuracy" in self.utility:
                flat["retain_accuracy"] = self.utility["retain_accuracy"]
        flat["forget_accuracy"] = self.forget_accuracy
        if self.per_sample is not None:
            flat.update(per_sample_requests=len(self.per_sample.requests),
                        per_sample_flagged=self.per_sample.n_flagged,
                        per_sample_flagged_before=self.per_sample.n_flagged_before,
                        per_sample_not_testable=self.per_sample.n_not_testable,
                        per_sample_references=self.per_sample.references,
                        per_sample_alpha=self.per_sample.alpha)
        if self.class_check:
            flat["forget_class_accuracy"] = self.class_check["forget_class_accuracy"]
        if self.backdoor:
            flat["attack_success_rate"] = self.backdoor["attack_success_rate"]
            flat["base_attack_success_rate"] = self.backdoor["base_attack_success_rate"]
        return _plain(flat)

    def to_dict(self) -> dict[str, Any]:
        """JSON for the job and version rows; keys a reader of version 1 knew keep their
        meaning (``class`` is ``class_check``)."""
        body: dict[str, Any] = {
            "version": REPORT_VERSION, "scenario": self.scenario, "n_forget": self.n_forget,
            "evidence": self.evidence, "outcome": self.outcome, "mia": self.mia, "ks": self.ks,
            "utility": self.utility, "forget_accuracy": self.forget_accuracy,
            "per_sample": self.per_sample.to_dict() if self.per_sample else None,
            "per_sample_note": self.per_sample_note,
            "passed": self.passed, "reasons": list(self.reasons),
            "thresholds": self.thresholds.to_dict() if self.thresholds else None,
            "summary": self.summary()}
        if self.class_check is not None:
            body["class"] = self.class_check
        if self.backdoor is not None:
            body["backdoor"] = self.backdoor
        if self.run is not None:
            body["run"] = asdict(self.run) | {"weights_changed": self.run.weights_changed}
            body.update(method=self.run.method, escalation_level=self.run.escalation_level,
                        steps=self.run.steps, seconds=round(self.run.seconds, 3))
        return _plain(body)

    def record(self, *, run: MethodRun, thresholds: Thresholds) -> VerificationReport:
        """Attach the method's run and decide; returns self."""
        self.run = run
        decide(self, thresholds)
        return self


def _accuracy(model: nn.Module, samples: SampleSet, device: torch.device) -> float:
    return evaluate(model, samples, device)["accuracy"]


def build_verification_report(candidate: nn.Module, base: nn.Module, *, forget: SampleSet,
                              audit: SampleSet, test: SampleSet, scenario: Scenario,
                              device: torch.device, retain: SampleSet | None = None,
                              references: GateReferences | None = None, alpha: float = 0.05,
                              seed: int = 0) -> VerificationReport:
    """Everything the gate needs about ``candidate``, with the same numbers for ``base`` (the
    version it was derived from) where a comparison says how much signal was removed.

    ``audit``: the verifier's half of the holdout, which the unlearning method never saw
    (docs/methods.md, "Data slices"); ``retain``: optional retain sample, for the
    retain-accuracy check; ``references``: the gate half of the model's reference statistics
    for ``forget`` and ``audit``, which makes
    the per-request test run (subset requests only: a class or a backdoor has its own target)."""
    n_forget = len(forget)
    report = VerificationReport(scenario=scenario.to_dict(), n_forget=n_forget)
    counterpart = scenario.unseen_counterpart(audit)
    if n_forget >= 10 and len(counterpart) >= 10:
        report.mia = {
            "feature_set": "loss",
            "candidate": forget_mia(candidate, forget, audit, scenario, device,
                                    seed=seed).to_dict(),
            "base": forget_mia(base, forget, audit, scenario, device, seed=seed).to_dict(),
            "candidate_strong": forget_mia(candidate, forget, audit, scenario, device,
                                           feature_set="strong", seed=seed).to_dict(),
        }
    if len(counterpart) and n_forget:
        forget_losses = per_sample_loss(predict_logits(candidate, forget, device), forget.y.cpu())
        counterpart_losses = per_sample_loss(predict_logits(candidate, counterpart, device),
                                             counterpart.y.cpu())
        report.ks = ks_forget_test(forget_losses, counterpart_losses).to_dict()
    if references is None:
        report.per_sample_note = "no reference statistics for this model version"
    elif scenario.kind != "subset":
        report.per_sample_note = f"the {scenario.kind} scenario is judged by its own target"
    elif n_forget:
        report.per_sample = per_request_test(
            candidate_phi=sample_phi(candidate, forget, device),
            base_phi=sample_phi(base, forget, device), forget_out=references.forget_out,
            holdout_candidate_phi=sample_phi(candidate, audit, device),
            holdout_base_phi=sample_phi(base, audit, device),
            holdout_out=references.holdout_out, request_of=references.request_of,
            alpha=alpha, seed=seed, reference_set=references.reference_set)
    utility = utility_test_set(test, scenario)
    test_candidate, test_base = (_accuracy(candidate, utility, device),
                                 _accuracy(base, utility, device))
    report.utility = {"test_accuracy": test_candidate, "base_test_accuracy": test_base,
                      "test_accuracy_drop": test_base - test_candidate, "n_test": len(utility)}
    if retain is not None and len(retain):
        retain_candidate, retain_base = (_accuracy(candidate, retain, device),
                                         _accuracy(base, retain, device))
        report.utility.update({"retain_accuracy": retain_candidate,
                               "base_retain_accuracy": retain_base,
                               "retain_accuracy_drop": retain_base - retain_candidate})
    report.forget_accuracy = _accuracy(candidate, forget, device) if n_forget else None
    if scenario.kind == "class":
        forgotten = test.subset(torch.nonzero(torch.eq(test.y, scenario.class_label)).flatten())
        report.class_check = {"forget_class": scenario.forget_class,
                              "forget_class_accuracy": _accuracy(candidate, forgotten, device),
                              "base_forget_class_accuracy": _accuracy(base, forgotten, device),
                              "n": len(forgotten)}
    if scenario.kind == "backdoor" and scenario.trigger is not None:
        target = int(scenario.target_label)  # type: ignore[arg-type]
        report.backdoor = {
            "target_label": scenario.target_label,
            "attack_success_rate": attack_success_rate(candidate, test, scenario.trigger,
                                                       target, device),
            "base_attack_success_rate": attack_success_rate(base, test, scenario.trigger,
                                                            target, device),
        }
    report.mia, report.ks, report.utility = (_plain(report.mia), _plain(report.ks),
                                             _plain(report.utility))
    report.class_check, report.backdoor = _plain(report.class_check), _plain(report.backdoor)
    return report


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


def decide(report: VerificationReport, thresholds: Thresholds | None = None) -> bool:
    """Pass only if every applicable check passes; records ``passed``, every failed check in
    ``reasons`` and the thresholds on the report, and returns ``passed``. A request the
    per-request test still flags fails the candidate with a reason naming the request."""
    limits = thresholds or Thresholds()
    failures: list[str] = []
    population = report.mia is not None and report.n_forget >= limits.min_population
    if population:
        mia = report.mia["candidate"]  # type: ignore[index]
        if mia["indiscernibility"] < limits.min_indiscernibility:
            failures.append(f"membership attack accuracy {mia['accuracy']:.3f} "
                            f"(n={mia['n_members']}) gives indiscernibility "
                            f"{mia['indiscernibility']:.3f} < {limits.min_indiscernibility}")
    # The KS test: a second check for small forget sets, where the population attack is noisy.
    if report.ks is None:
        if not population and report.n_forget:
            failures.append("no audit data like the forget set to verify against")
    elif population and report.n_forget >= limits.ks_below:
        pass
    elif report.ks["p_value"] < limits.min_ks_p_value:
        failures.append(f"KS test: forget losses do not look unseen "
                        f"(p={report.ks['p_value']:.3g}, n={report.ks['n']}) < "
                        f"{limits.min_ks_p_value}")
    if report.per_sample is not None:
        for evidence in report.per_sample.requests:
            if evidence.flagged:
                failures.append(
                    f"request {evidence.request_id}: its {evidence.n_testable} samples still "
                    f"look like members (per-sample p={evidence.p_value:.3g}, Benjamini-"
                    f"Hochberg at alpha {report.per_sample.alpha}, "
                    f"{report.per_sample.references} OUT references per sample)")
    utility = report.utility
    if utility and utility["test_accuracy_drop"] > limits.max_test_accuracy_drop:
        failures.append(f"test accuracy dropped by {utility['test_accuracy_drop']:.3f} > "
                        f"{limits.max_test_accuracy_drop}")
    if limits.max_retain_accuracy_drop is not None and "retain_accuracy_drop" in utility \
            and utility["retain_accuracy_drop"] > limits.max_retain_accuracy_drop:
        failures.append(f"retain accuracy dropped by {utility['retain_accuracy_drop']:.3f} > "
                        f"{limits.max_retain_accuracy_drop}")
    if report.class_check and report.class_check["forget_class_accuracy"] > \
            limits.max_forget_class_accuracy:
        failures.append(f"forgotten class still recognised: accuracy "
                        f"{report.class_check['forget_class_accuracy']:.3f} > "
                        f"{limits.max_forget_class_accuracy}")
    if report.backdoor:
        asr = report.backdoor["attack_success_rate"]
        if asr > limits.max_attack_success_rate:
            failures.append(f"backdoor still works: attack success rate {asr:.3f} > "
                            f"{limits.max_attack_success_rate}")
    report.passed, report.reasons, report.thresholds = not failures, failures, limits
    return report.passed
