"""The lab: `lethe lab run` runs unlearning experiments (:mod:`unlearning.lab.run`) and
`lethe lab table` reports them (:mod:`unlearning.lab.report`)."""

from unlearning.lab.report import (
    machines_by_seed,
    markdown_report,
    markdown_table,
    merge_by_scenario,
    merge_results,
)
from unlearning.lab.run import (
    DEFAULT_RECIPES,
    METRIC_KEYS,
    LabConfig,
    ModelCache,
    SeedData,
    model_cache_keys,
    model_spec,
    prepare_seed,
    retime,
    run_lab,
    seed_metrics,
)

__all__ = ["DEFAULT_RECIPES", "METRIC_KEYS", "LabConfig", "ModelCache", "SeedData",
           "machines_by_seed", "markdown_report", "markdown_table", "merge_by_scenario",
           "merge_results", "model_cache_keys", "model_spec", "prepare_seed", "retime",
           "run_lab", "seed_metrics"]
