"""The verifier's attacks: it finds membership where a model memorised its training data, and
finds none where the data was never trained on (the retrain)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unlearning.conftest import CPU, World
from unlearning.loops import predict_logits
from unlearning.verification.metrics import forget_mia
from unlearning.verification.mia import (
    attack_features,
    ks_forget_test,
    per_sample_loss,
    population_mia,
)


def test_population_attack_is_near_perfect_on_separated_features_and_blind_on_equal_ones(
) -> None:
    rng = np.random.default_rng(0)
    separated = population_mia(rng.normal(0, 1, 500), rng.normal(4, 1, 500))
    assert separated.accuracy > 0.95 and separated.auc > 0.95
    same = population_mia(rng.normal(0, 1, 500), rng.normal(0, 1, 500))
    assert abs(same.accuracy - 0.5) < 0.05
    assert same.ci_low < 0.5 < same.ci_high
    assert same.indiscernibility > 0.9 and separated.indiscernibility < 0.2
    assert same.n_members == 500 and same.n_splits == 10


def test_population_attack_refuses_a_handful_of_samples() -> None:
    with pytest.raises(ValueError, match="KS test"):
        population_mia(np.zeros(5), np.ones(5))


def test_ks_test_is_honest_for_a_single_subjects_few_samples() -> None:
    rng = np.random.default_rng(1)
    holdout = rng.exponential(0.3, 2000)
    unseen_like = ks_forget_test(rng.exponential(0.3, 5), holdout)
    memorised = ks_forget_test(np.full(5, 1e-6), holdout)
    assert unseen_like.p_value > 0.05
    assert memorised.p_value < 0.01 and memorised.n == 5


def test_attack_finds_membership_in_an_overfit_original_but_not_in_its_retrain(
        subset_world: World) -> None:
    data = subset_world.data
    assert subset_world.retrain is not None
    on_original = forget_mia(subset_world.original, data.forget, data.audit, data.scenario, CPU)
    on_retrain = forget_mia(subset_world.retrain, data.forget, data.audit, data.scenario, CPU)
    assert on_original.accuracy > 0.56 and on_original.ci_low > 0.5
    assert abs(on_retrain.accuracy - 0.5) < 0.03
    assert on_original.n_members == len(data.forget)


def test_strong_features_and_ks_test_agree_with_the_loss_attack(subset_world: World) -> None:
    data = subset_world.data
    assert subset_world.retrain is not None
    strong = forget_mia(subset_world.original, data.forget, data.audit, data.scenario, CPU,
                        feature_set="strong")
    assert strong.accuracy > 0.55
    for model, should_find in ((subset_world.original, True), (subset_world.retrain, False)):
        forget_logits = predict_logits(model, data.forget, CPU)
        audit_logits = predict_logits(model, data.audit, CPU)
        assert attack_features(forget_logits, data.forget.y, "strong").shape == (
            len(data.forget), 5)
        ks = ks_forget_test(per_sample_loss(forget_logits, data.forget.y),
                            per_sample_loss(audit_logits, data.audit.y))
        assert (ks.p_value < 1e-3) == should_find, ks
