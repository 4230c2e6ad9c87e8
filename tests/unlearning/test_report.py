"""The verification report is typed and stores as plain JSON, and the gate refuses models
that did not forget, naming every reason."""

from __future__ import annotations

import json

import torch

from tests.unlearning.conftest import CPU, World
from unlearning.verification.report import (
    POPULATION_ONLY,
    Thresholds,
    VerificationReport,
    build_verification_report,
    decide,
)


def _report(world: World, candidate) -> VerificationReport:
    data = world.data
    return build_verification_report(candidate, world.original, forget=data.forget,
                                     audit=data.audit, test=data.test,
                                     scenario=data.scenario, device=CPU,
                                     retain=data.retain_eval)


def test_gate_fails_the_original_and_passes_its_retrain_on_membership(
        subset_world: World) -> None:
    assert subset_world.retrain is not None
    unchanged = _report(subset_world, subset_world.original)
    assert not decide(unchanged)
    stored = json.loads(json.dumps(unchanged.to_dict(), allow_nan=False))  # what the worker keeps
    assert stored["passed"] is False and stored["summary"]["passed"] is False
    assert any("membership attack" in reason for reason in unchanged.reasons)
    assert unchanged.mia is not None
    assert unchanged.mia["base"]["accuracy"] == unchanged.mia["candidate"]["accuracy"]
    # no reference statistics were given: the report says which evidence it rests on
    assert unchanged.evidence == POPULATION_ONLY and stored["evidence"] == POPULATION_ONLY
    assert unchanged.per_sample is None and unchanged.per_sample_note

    retrained = _report(subset_world, subset_world.retrain)
    assert retrained.mia is not None and retrained.mia["candidate"]["indiscernibility"] >= 0.9
    decide(retrained)
    assert not any("membership" in r for r in retrained.reasons)
    # a utility threshold the retrain cannot meet fails it, with that reason alone
    assert not decide(retrained, Thresholds(max_test_accuracy_drop=-1.0))
    assert retrained.reasons and all("test accuracy dropped" in r for r in retrained.reasons)


def test_gate_fails_a_model_that_still_knows_the_forgotten_class(class_world: World) -> None:
    report = _report(class_world, class_world.original)
    assert report.class_check is not None and report.class_check["forget_class_accuracy"] > 0.5
    assert not decide(report)
    assert any("forgotten class still recognised" in r for r in report.reasons)
    assert report.to_dict()["class"] == report.class_check


def test_gate_fails_a_model_whose_backdoor_still_works(backdoor_world: World) -> None:
    report = _report(backdoor_world, backdoor_world.original)
    assert report.backdoor is not None and report.backdoor["attack_success_rate"] >= 0.9
    assert not decide(report)
    assert any("backdoor still works" in r for r in report.reasons)


def test_small_forget_sets_are_judged_by_the_ks_test(subset_world: World) -> None:
    data = subset_world.data
    few = data.forget.subset(torch.arange(8))
    report = build_verification_report(subset_world.original, subset_world.original,
                                       forget=few, audit=data.audit, test=data.test,
                                       scenario=data.scenario, device=CPU)
    assert report.n_forget == 8 and report.ks is not None and report.ks["n"] == 8
    assert not decide(report, Thresholds(min_ks_p_value=1.0))  # any p-value below 1 fails
    assert any("KS test" in r for r in report.reasons)
    assert not any("membership" in r for r in report.reasons)
