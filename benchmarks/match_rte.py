"""match's run-time efficiency on the full Fashion-MNIST training set, with both sides timed in
one process under the same conditions.

    .venv/bin/python benchmarks/match_rte.py --seed 0

The retrain's cost is timed on two epochs of its recipe over the retain set and scaled to the
recipe's epochs (an epoch costs the same whatever the learning rate); then match runs on the
cached original (`lethe lab run` trains and caches it, and the retrain the metrics compare
against) with the published defaults, with the loss statistic, and with the loss statistic
and a check every 10 steps (the defaults before), so the table shows what each choice costs.
CPU seconds of this process, 1 thread. Writes benchmarks/results/match-rte-fashion-mnist-full.*.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from unlearning.architectures import build_model  # noqa: E402
from unlearning.data.datasets import load_dataset  # noqa: E402
from unlearning.lab import (  # noqa: E402
    LabConfig,
    ModelCache,
    model_cache_keys,
    model_spec,
    prepare_seed,
)
from unlearning.methods import get_method  # noqa: E402
from unlearning.training import train  # noqa: E402
from unlearning.verification.metrics import retdev, scenario_metrics  # noqa: E402

TIMED_EPOCHS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=REPO / ".lethe")
    parser.add_argument("--defaults-only", action="store_true",
                        help="Run match with its defaults only.")
    parser.add_argument("--without-retrain", action="store_true",
                        help="Time only: no retrained model, so no RetDev and no MIA gap (a "
                             "seed whose retrain is not cached, 20 minutes saved).")
    parser.add_argument("--name", default="match-rte-fashion-mnist-full")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    config = LabConfig(dataset="fashion-mnist", arch="cnn-small", scenario="subset",
                       methods=("match",), seeds=(args.seed,), data_dir=args.data_dir)
    dataset = load_dataset(config.dataset, config.data_dir)
    spec = model_spec(config, dataset)
    data = prepare_seed(config, dataset, args.seed)
    recipe = config.effective_recipe

    timed = train(build_model(spec), data.retain, recipe.with_(epochs=TIMED_EPOCHS), device=cpu,
                  seed=args.seed)
    retrain_cpu = timed["cpu_seconds"] / TIMED_EPOCHS * recipe.epochs
    print(f"retrain: {TIMED_EPOCHS} epochs {timed['cpu_seconds']:.1f} s CPU -> "
          f"{recipe.epochs} epochs {retrain_cpu:.0f} s", flush=True)

    cache = ModelCache(Path(config.data_dir) / "lab-cache" / config.dataset)
    original_key, retrain_key = model_cache_keys(config, data)
    original, _ = cache.get_or_train(original_key, spec, data.train, recipe, args.seed, cpu, None)

    def measure(model: torch.nn.Module) -> dict[str, Any]:
        return scenario_metrics(model, forget=data.forget, retain=data.retain_eval,
                                test=data.test, holdout=data.audit, scenario=data.scenario,
                                device=cpu, seed=args.seed)

    retrain_metrics: dict[str, Any] | None = None
    if not args.without_retrain:
        retrain, _ = cache.get_or_train(retrain_key, spec, data.retain, recipe, args.seed, cpu,
                                        None)
        retrain_metrics = measure(retrain)
    match = get_method("match")
    variants = [("defaults (confidence statistic, spaced checks)", match.Config()),
                ("loss statistic, spaced checks", match.Config(statistic="loss")),
                ("loss statistic, a check every 10 steps (the previous defaults)",
                 match.Config(statistic="loss", max_check_every=10))][
        :1 if args.defaults_only else None]
    runs = []
    for name, match_config in variants:
        result = match.unlearn(original, retain=data.retain, forget=data.forget,
                               reference=data.reference, original_recipe=recipe,
                               scenario=data.scenario, config=match_config, device=cpu,
                               seed=args.seed)
        metrics = measure(result.model)
        run = {"variant": name, "steps": result.steps,
               "checks": len(result.details["checks"]) - 1,
               "stopped": result.details["stopped"], "cpu_seconds": result.cpu_seconds,
               "rte": retrain_cpu / result.cpu_seconds,
               "retdev": retdev(metrics, retrain_metrics) if retrain_metrics else None,
               "mia_gap": abs(metrics["mia_accuracy"] - retrain_metrics["mia_accuracy"])
               if retrain_metrics else None,
               **{k: metrics[k] for k in ("retain_acc", "forget_acc", "test_acc",
                                          "mia_accuracy")}}
        runs.append(run)
        print(json.dumps(run), flush=True)

    rows = ["| variant | checks | steps | CPU s | RTE | RetDev | MIA gap | RA | FA | TA | MIA |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows += [f"| {r['variant']} | {r['checks']} | {r['steps']} | {r['cpu_seconds']:.1f} | "
             f"{r['rte']:.1f} | {cell(r['retdev'])} | {cell(r['mia_gap'])} | "
             + " | ".join(cell(r[k]) for k in ("retain_acc", "forget_acc", "test_acc",
                                                "mia_accuracy")) + " |"
             for r in runs]
    rows.append(f"| retrain | - | - | {retrain_cpu:.0f} | 1.0 | 0 | 0 | " + " | ".join(
        cell(retrain_metrics[k] if retrain_metrics else None)
        for k in ("retain_acc", "forget_acc", "test_acc", "mia_accuracy")) + " |")
    host = machine()
    report = "\n".join([
        "# match: RTE on the full Fashion-MNIST training set", "",
        f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']}.", "",
        f"cnn-small, seed {args.seed}: {len(data.train)} training images, "
        f"{len(data.forget)} forgotten (10 %), {len(data.retain)} retained. The retrain's "
        f"{recipe.epochs} epochs are timed from {TIMED_EPOCHS} of them "
        f"({timed['cpu_seconds']:.1f} s of CPU) in the same process as the match runs, "
        "1 thread, so the ratio compares like with like.", "", *rows, ""])
    write_results(str(RESULTS / args.name),
                  {"machine": host, "seed": args.seed, "retrain_cpu_seconds": retrain_cpu,
                   "retrain_timed_epochs": TIMED_EPOCHS,
                   "retrain_timed_cpu_seconds": timed["cpu_seconds"],
                   "retrain": {k: retrain_metrics[k] for k in
                               ("retain_acc", "forget_acc", "test_acc", "mia_accuracy")}
                   if retrain_metrics else None,
                   "runs": runs}, lambda _: report)


if __name__ == "__main__":
    main()
