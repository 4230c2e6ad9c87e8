"""The per-request membership test: its pieces on known numbers, then on a real overfit
Fashion-MNIST world with reference models trained by the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tests.unlearning.conftest import CPU
from tests.unlearning.reference_world import ReferenceWorld
from unlearning.verification.per_sample import (
    MIN_OUT,
    PerSampleEvidence,
    benjamini_hochberg,
    group_null,
    per_request_test,
    pooled_spread,
    score,
)
from unlearning.verification.references import (
    GATE,
    METHOD,
    ReferencePlan,
    check_reference_count,
    sample_phi,
)
from unlearning.verification.report import (
    PER_SAMPLE,
    GateReferences,
    build_verification_report,
    decide,
)

ALPHA = 0.05


def test_reference_plan_puts_every_sample_out_twice_per_half_and_halves_never_mix() -> None:
    plan = ReferencePlan(k=8, n_train=101, seed=3, n_holdout=51)
    trains = np.stack([plan.trains_on(i) for i in range(8)])
    keeps = np.stack([plan.keeps_holdout(i) for i in range(8)])
    # the holdout is split per pair like the training set: OUT in exactly one model per pair
    assert (keeps[0::2] ^ keeps[1::2]).all() and (np.sum(keeps[:4], axis=0) == 2).all()
    assert not np.array_equal(keeps[0], keeps[2])
    assert np.array_equal(trains, np.stack([ReferencePlan(8, 101, 3).trains_on(i)
                                            for i in range(8)]))  # a restart trains the same
    assert (np.sum(~trains[:4], axis=0) == 2).all() and (np.sum(~trains[4:], axis=0) == 2).all()
    assert not np.array_equal(trains[0], trains[2])  # pairs draw their own halves
    for k in (0, 2, 4, 6, 10, 20, 10_000):
        with pytest.raises(ValueError, match="multiple of 4"):
            check_reference_count(k)
    assert [check_reference_count(k) for k in (8, 12, 16)] == [8, 12, 16]


def test_scores_pool_the_spread_and_refuse_samples_with_too_few_out_values() -> None:
    out = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]])
    assert pooled_spread(out) == pytest.approx(np.sqrt((1 + 1 + 1 + 1) / 2))
    scores, testable = score(np.array([2.0, 3.0, 9.0]), out)
    assert testable.tolist() == [True, True, False] and np.isnan(scores[2])
    assert scores[:2] == pytest.approx([0.0, 0.0])
    assert MIN_OUT == 2


def test_group_null_p_values_are_uniform_and_power_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    null = rng.normal(size=600)
    small, big = group_null(null, 5), group_null(null, 50)
    draws = [small.p_value(float(rng.choice(null, 5, replace=False).mean())) for _ in range(400)]
    assert stats.kstest(draws, "uniform").pvalue > 0.01
    assert big.detectable_shift(ALPHA) < small.detectable_shift(ALPHA)
    # 5 standard normal samples: shift (z_0.95 + z_0.8) / sqrt(5) = 1.11
    assert small.detectable_shift(ALPHA) == pytest.approx(1.11, abs=0.12)
    assert group_null(null, 500).means is None  # normal approximation for large groups


def test_benjamini_hochberg_matches_the_step_up_rule() -> None:
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.5], 0.05) == [True, False, False, False]
    assert benjamini_hochberg([0.01, 0.02, 0.03, 0.04], 0.05) == [True, True, True, True]
    assert benjamini_hochberg([], 0.05) == []


def _evidence(world: ReferenceWorld, model: torch.nn.Module, positions: np.ndarray,
              request_of: list[str]) -> PerSampleEvidence:
    forget_out, holdout_out = world.statistics.out_values(GATE, train=positions)
    samples = world.train.subset(torch.from_numpy(positions))
    holdout = world.world.data.audit
    phi, holdout_phi = sample_phi(model, samples, CPU), sample_phi(model, holdout, CPU)
    base_phi = sample_phi(world.world.original, samples, CPU)
    base_holdout = sample_phi(world.world.original, holdout, CPU)
    return per_request_test(candidate_phi=phi, base_phi=base_phi, forget_out=forget_out,
                            holdout_candidate_phi=holdout_phi, holdout_base_phi=base_holdout,
                            holdout_out=holdout_out, request_of=request_of, alpha=ALPHA)


def test_flags_the_original_for_memorised_subjects_and_passes_their_retrain(
        reference_world: ReferenceWorld) -> None:
    """Acceptance: 6 subjects of 5 samples the original memorised (chosen with the method
    half); the retrain never saw them."""
    positions = reference_world.memorised(30)
    subjects = [f"subject-{i // 5}" for i in range(30)]
    unchanged = _evidence(reference_world, reference_world.world.original, positions, subjects)
    assert unchanged.n_flagged == 6, unchanged
    assert all(r.p_value is not None and r.p_value < ALPHA for r in unchanged.requests)
    assert all(r.n == 5 and r.n_testable == 5 for r in unchanged.requests)
    assert unchanged.references == 2 and unchanged.reference_models == 4
    assert all(r.detectable_shift is not None and 0 < r.detectable_shift < 3
               for r in unchanged.requests)
    retrain = reference_world.world.retrain
    assert retrain is not None
    retrained = _evidence(reference_world, retrain, positions, subjects)
    assert retrained.n_flagged == 0, retrained
    assert retrained.n_flagged_before == 6  # the base (the original) was memorising them
    assert PerSampleEvidence.from_dict(retrained.to_dict()) == retrained


def test_gate_refuses_the_unchanged_candidate_naming_the_request(
        reference_world: ReferenceWorld) -> None:
    positions = reference_world.memorised(10)
    data = reference_world.world.data
    forget_out, holdout_out = reference_world.statistics.out_values(GATE, train=positions)
    request_of = ["req-a"] * 5 + ["req-b"] * 5
    forget = reference_world.train.subset(torch.from_numpy(positions))
    report = build_verification_report(
        reference_world.world.original, reference_world.world.original, forget=forget,
        audit=data.audit, test=data.test, scenario=data.scenario, device=CPU,
        references=GateReferences(forget_out, holdout_out, request_of), alpha=ALPHA)
    assert report.evidence == PER_SAMPLE
    assert not decide(report)
    assert any(r.startswith("request req-a: its 5 samples still look like members")
               for r in report.reasons)
    assert report.reasons_for("req-a") != report.reasons_for("req-b")
    assert not any("req-b" in r for r in report.reasons_for("req-a"))
    assert report.to_dict()["per_sample"]["n_flagged"] == 2


def test_calibration_under_a_retrain_that_never_saw_the_subjects(
        reference_world: ReferenceWorld) -> None:
    """Every forgotten sample (400), as 80 random subjects of 5, under the retrain: each
    subject's p-value is a test at alpha, and the share below it must stay within alpha's
    binomial interval."""
    retrain = reference_world.world.retrain
    assert retrain is not None
    positions = np.random.default_rng(5).permutation(reference_world.n_forget)
    subjects = [f"s{i // 5}" for i in range(len(positions))]
    evidence = _evidence(reference_world, retrain, positions, subjects)
    p_values = [r.p_value for r in evidence.requests]
    assert len(p_values) == 80 and None not in p_values
    rejected = sum(p < ALPHA for p in p_values)  # type: ignore[operator]
    upper = stats.binom.ppf(0.975, len(p_values), ALPHA)
    assert rejected <= upper, (rejected, upper)
    # ... while the original, which trained on them, is caught more often than chance
    original = _evidence(reference_world, reference_world.world.original, positions, subjects)
    assert sum(r.p_value < ALPHA for r in original.requests) > upper  # type: ignore[operator]


def test_method_half_is_disjoint_from_the_gate_half(reference_world: ReferenceWorld) -> None:
    gate, _ = reference_world.statistics.out_values(GATE)
    method, _ = reference_world.statistics.out_values(METHOD)
    assert gate.shape == method.shape == (4, len(reference_world.train))
    # every training sample is OUT in exactly two models of each half; holdout in two as well
    assert (np.sum(~np.isnan(gate), axis=0) == 2).all()
    assert (np.sum(~np.isnan(method), axis=0) == 2).all()
    _, holdout = reference_world.statistics.out_values(GATE)
    assert (np.sum(~np.isnan(holdout), axis=0) == 2).all()


def test_samples_without_enough_out_references_are_counted_not_passed() -> None:
    rng = np.random.default_rng(1)
    forget_out = rng.normal(size=(4, 6))
    forget_out[:3, 4:] = np.nan  # the last two samples have a single OUT value
    holdout_out = rng.normal(size=(4, 300))
    evidence = per_request_test(
        candidate_phi=rng.normal(size=6), base_phi=rng.normal(size=6), forget_out=forget_out,
        holdout_candidate_phi=rng.normal(size=300), holdout_base_phi=rng.normal(size=300),
        holdout_out=holdout_out, request_of=["a", "a", "a", "a", "b", "b"], alpha=ALPHA)
    a, b = evidence.requests
    assert (a.n, a.n_testable, b.n, b.n_testable) == (4, 4, 2, 0)
    assert b.p_value is None and not b.flagged and not b.testable
    assert evidence.n_not_testable == 2
