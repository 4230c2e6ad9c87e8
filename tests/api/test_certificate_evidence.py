"""What a certificate says about its evidence, read from the job's stored report: figures for
its own request only, and words that claim no more than the report shows."""

from __future__ import annotations

from app.certificates.service import evidence_for

RUN = {"method": "match", "steps": 90, "weights_changed": True,
       "parent_tensor_sha256": "a" * 64, "tensor_sha256": "b" * 64}
ROW = {"request_id": "r1", "n": 5, "n_testable": 4, "p_value": 0.41, "p_before": 0.004,
       "flagged": False, "flagged_before": True, "detectable_shift": 1.02,
       "mean_score": 0.1, "mean_score_before": 1.4}


def test_per_sample_evidence_names_its_own_figures_only() -> None:
    other = {**ROW, "request_id": "r2", "p_value": 0.9}
    report = {"evidence": "per-sample", "outcome": "unlearned", "run": RUN,
              "per_sample": {"requests": [ROW, other], "references": 2, "alpha": 0.05}}
    entry = evidence_for(report, "r1")
    assert entry["evidence"] == "per-sample" and entry["per_sample"]["p_value"] == 0.41
    assert entry["per_sample"]["p_before"] == 0.004 and entry["weights_changed"] is True
    assert "r2" not in str(entry) and "0.9" not in entry["statement"]
    assert "1 samples had too few reference models" in entry["statement"]
    assert "ran 90 steps and changed the weights" in entry["statement"]


def test_population_only_and_unchanged_are_said_in_words() -> None:
    report = {"evidence": "population-only", "outcome": "unchanged",
              "run": {**RUN, "steps": 0, "weights_changed": False},
              "summary": {"mia_n": 40, "mia_ci95": [0.4, 0.7], "ks_p_value": 0.3}}
    entry = evidence_for(report, "r1")
    assert entry["evidence"] == "population-only" and "per_sample" not in entry
    assert "no per-sample test backs this request" in entry["statement"]
    assert "0.40 to 0.70" in entry["statement"] and "little power" in entry["statement"]
    assert "was not unlearned" in entry["statement"] and "changed the weights" not in \
        entry["statement"]
    # a per-sample report without this request's row is population-only for it
    report = {"evidence": "per-sample", "outcome": "unlearned", "run": RUN,
              "per_sample": {"requests": [{**ROW, "request_id": "r2"}]}}
    assert evidence_for(report, "r1")["evidence"] == "population-only"
    none = evidence_for({"evidence": "none-needed", "outcome": "unchanged"}, "r1")
    assert "never trained on them" in none["statement"]
