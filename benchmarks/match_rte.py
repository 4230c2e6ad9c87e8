"""match's run-time efficiency on the full Fashion-MNIST training set, with both sides timed in
one process under the same conditions.

    .venv/bin/python benchmarks/match_rte.py --seeds 0,1,2 --defaults-only

The retrain's cost is timed on two epochs of its recipe over the retain set and scaled to the
recipe's epochs (an epoch costs the same whatever the learning rate); then match runs on the
cached original (`lethe lab run` trains and caches it, and the retrain the metrics compare
against) with the published defaults (the classifier head only, the large-set stopping
rule), with the smaller sets' stopping rule, with every layer trained (the defaults
before), with the bare confidence statistic, with the loss statistic, and with the loss
statistic and a check every 10 steps (the first defaults), so the table shows what each
choice costs (``--variants`` picks some).
CPU seconds of this process, 1 thread; on a machine others share, a neighbour moves the
retrain's timing by up to 30 %, so run it on an idle machine. Several seeds run one after
another in one process, with a summary of the defaults over them. Writes
benchmarks/results/match-rte-fashion-mnist-full.* (or --name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from unlearning.data.datasets import ImageDataset, load_dataset  # noqa: E402
from unlearning.lab import (  # noqa: E402
    LabConfig,
    ModelCache,
    model_cache_keys,
    model_spec,
    prepare_seed,
    retime,
    seed_metrics,
)
from unlearning.methods import get_method  # noqa: E402
from unlearning.verification.metrics import retdev  # noqa: E402

TIMED_EPOCHS = 2
# the metric columns
SHOWN = ("retain_accuracy", "forget_accuracy", "test_accuracy", "mia_accuracy")
DATASET = "fashion-mnist"
SMALL_SET_RULE = {"check_size": 1000, "stopping_fraction": 0.5, "tolerance": 0.02}
EVERY_LAYER = {"trainable": "all", **SMALL_SET_RULE}  # match before 2026-12-01
# key: (the table's name, match's config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults": ("defaults (margin statistic, head only, large-set stopping rule)", {}),
    "small-set-rule": ("head only, the smaller sets' stopping rule before 2026-12-01 (1 000 "
                       "forget samples, half of unseen, within 0.02)",
                       SMALL_SET_RULE),
    "all-layers": ("every layer trained, the smaller sets' stopping rule (the defaults "
                   "before)", EVERY_LAYER),
    "confidence": ("confidence statistic, every layer (the defaults before that)",
                   {"statistic": "confidence", **EVERY_LAYER}),
    "loss": ("loss statistic, spaced checks, every layer", {"statistic": "loss",
                                                            **EVERY_LAYER}),
    "loss-every-10": ("loss statistic, a check every 10 steps, every layer (the first "
                      "defaults)", {"statistic": "loss", "max_check_every": 10,
                                    **EVERY_LAYER}),
}


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def measure_seed(seed: int, dataset: ImageDataset, args: argparse.Namespace) -> dict[str, Any]:
    """Time the retrain and every match variant on one seed; metrics against its retrain."""
    cpu = torch.device("cpu")
    config = LabConfig(dataset=DATASET, arch="cnn-small", scenario="subset",
                       methods=("match",), seeds=(seed,), data_dir=args.data_dir)
    spec = model_spec(config, dataset)
    data = prepare_seed(config, dataset, seed)
    recipe = config.effective_recipe

    retrain_cpu = retime(spec, data.retain, recipe, TIMED_EPOCHS, seed, cpu)["cpu_seconds"]
    timed_cpu = retrain_cpu * TIMED_EPOCHS / recipe.epochs
    print(f"seed {seed}: retrain {TIMED_EPOCHS} epochs {timed_cpu:.1f} s CPU -> "
          f"{recipe.epochs} epochs {retrain_cpu:.0f} s", flush=True)

    cache = ModelCache(Path(config.data_dir) / "lab-cache" / config.dataset)
    original_key, retrain_key = model_cache_keys(config, data)
    original, _ = cache.get_or_train(original_key, spec, data.train, recipe, seed, cpu, None)

    def measure(model: torch.nn.Module) -> dict[str, Any]:
        return seed_metrics(model, data, cpu, seed)

    retrain_metrics: dict[str, Any] | None = None
    if not args.without_retrain:
        retrain, _ = cache.get_or_train(retrain_key, spec, data.retain, recipe, seed, cpu,
                                        None)
        retrain_metrics = measure(retrain)
    match = get_method("match")
    variants = [(VARIANTS[key][0], match.Config(**VARIANTS[key][1])) for key in args.variants]
    runs = []
    for name, match_config in variants:
        result = match.unlearn(original, retain=data.retain, forget=data.forget,
                               unseen=data.unseen, original_recipe=recipe,
                               scenario=data.scenario, config=match_config, device=cpu,
                               seed=seed)
        metrics = measure(result.model)
        run = {"variant": name, "steps": result.steps,
               "checks": len(result.details["checks"]) - 1,
               "stopped": result.details["stopped"], "cpu_seconds": result.cpu_seconds,
               "rte": retrain_cpu / result.cpu_seconds,
               "retdev": retdev(metrics, retrain_metrics) if retrain_metrics else None,
               "mia_gap": abs(metrics["mia_accuracy"] - retrain_metrics["mia_accuracy"])
               if retrain_metrics else None,
               **{k: metrics[k] for k in SHOWN}}
        runs.append(run)
        print(json.dumps(run), flush=True)
    return {"seed": seed, "n_train": len(data.train), "n_forget": len(data.forget),
            "n_retain": len(data.retain), "retrain_cpu_seconds": retrain_cpu,
            "retrain_timed_epochs": TIMED_EPOCHS,
            "retrain_timed_cpu_seconds": timed_cpu, "recipe_epochs": recipe.epochs,
            "retrain": {k: retrain_metrics[k] for k in SHOWN} if retrain_metrics else None,
            "runs": runs}


def seed_table(result: dict[str, Any]) -> list[str]:
    rows = [f"## seed {result['seed']}", "",
            "| variant | checks | steps | CPU s | RTE | RetDev | MIA gap | RA | FA | TA | MIA |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['variant']} | {r['checks']} | {r['steps']} | {r['cpu_seconds']:.1f} | "
             f"{r['rte']:.1f} | {cell(r['retdev'])} | {cell(r['mia_gap'])} | "
             + " | ".join(cell(r[k]) for k in SHOWN) + " |"
             for r in result["runs"]]
    retrain = result["retrain"]
    rows.append(f"| retrain | - | - | {result['retrain_cpu_seconds']:.0f} | 1.0 | 0 | 0 | "
                + " | ".join(cell(retrain[k] if retrain else None) for k in SHOWN) + " |")
    return rows + [""]


def report(result: dict[str, Any]) -> str:
    host, seeds = result["machine"], result["seeds"]
    first = seeds[0]
    lines = ["# match: RTE on the full Fashion-MNIST training set", "",
             f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']}, load "
             f"average at the end {', '.join(f'{x:.2f}' for x in host['load_average'])}.", "",
             f"cnn-small: {first['n_train']} training images, {first['n_forget']} forgotten "
             f"(10 %), {first['n_retain']} retained. Each seed's retrain is timed on "
             f"{first['retrain_timed_epochs']} of its {first['recipe_epochs']} epochs in the "
             "same process as the match runs, 1 thread, so the ratio compares like with "
             "like.", ""]
    defaults = [r for s in seeds for r in s["runs"] if r["variant"] == VARIANTS["defaults"][0]]
    if len(seeds) > 1 and len(defaults) == len(seeds):
        lines += ["## The defaults over the seeds", "",
                  "| seed | steps | CPU s | RTE | RetDev | MIA gap |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['seed']} | {r['steps']} | {r['cpu_seconds']:.1f} | {r['rte']:.1f} | "
                  f"{cell(r['retdev'])} | {cell(r['mia_gap'])} |"
                  for s, r in zip(seeds, defaults, strict=True)]
        rtes = [r["rte"] for r in defaults]
        lines += ["", f"RTE: mean {statistics.fmean(rtes):.1f}, lowest {min(rtes):.1f}.", ""]
    for seed_result in seeds:
        lines += seed_table(seed_result)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--seed", type=int, default=None, help="One seed (overrides --seeds).")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".lethe")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"Comma-separated, in order, of: {', '.join(VARIANTS)}.")
    parser.add_argument("--defaults-only", action="store_true",
                        help="Run match with its defaults only (--variants defaults).")
    parser.add_argument("--without-retrain", action="store_true",
                        help="Time only: no retrained model, so no RetDev and no MIA gap (a "
                             "seed whose retrain is not cached, 20 minutes saved).")
    parser.add_argument("--name", default="match-rte-fashion-mnist-full")
    args = parser.parse_args()
    args.variants = ["defaults"] if args.defaults_only else args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    torch.set_num_threads(1)
    seeds = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",")]
    dataset = load_dataset(DATASET, args.data_dir)  # read once for every seed
    results = [measure_seed(seed, dataset, args) for seed in seeds]
    write_results(str(RESULTS / args.name), {"machine": machine(), "seeds": results}, report)


if __name__ == "__main__":
    main()
