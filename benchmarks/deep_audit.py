"""Deep audit of `match` against retraining: a U-LiRA-style per-sample likelihood-ratio test
and the NeurIPS-2023 unlearning challenge's epsilon score (docs/methods.md, 'Deep audit:
per-sample likelihood-ratio test' and 'Deep audit: NeurIPS-2023 epsilon score').

    .venv/bin/python benchmarks/deep_audit.py [--pairs 16] [--train-size 2000]

One fixed Fashion-MNIST training set D and forget set F (the lab's subset split, seed 0).
For each pair k = 1..K: an original trained on D with seed k, unlearned with `match` (U_k),
and a retrain on D minus F with seed k (R_k). Per forget sample x the statistic is the
logit-scaled confidence ``log p_y(x) - log(1 - p_y(x))``.

* U-LiRA: for each held-out pair j, per sample, Gaussians are fitted to the statistic under
  the other K-1 unlearned and the other K-1 retrained models; U_j(x) and R_j(x) are each
  classified by the likelihood ratio. Accuracy over all (sample, pair, side) decisions: 0.5
  means the attacker cannot tell unlearning from retraining, 1.0 that it always can. The
  original models are audited the same way (originals vs retrains) as the positive control.
  The variation between models here is training randomness only (seeds), with D fixed; the
  published U-LiRA also resamples the data.
* Epsilon score: per sample, threshold attacks on the statistic under the K unlearned vs the
  K retrained models give false-positive and false-negative rates (add-one-half smoothed, so
  K models cannot claim a zero rate); ``eps = max(log((1 - d - FPR) / FNR), log((1 - d - FNR)
  / FPR))`` over thresholds and both directions, d = 1e-5. Forgetting quality
  ``F = mean 2^-n(eps)`` with n the index of eps's 0.5-wide bin; the score is
  ``F x (RA_u / RA_R) x (TA_u / TA_R)`` with mean accuracies. With K = 16 per side the
  smallest reachable rate is 1/33, so eps is capped near 3.5: the score is coarse at this K
  (the challenge used 512 models per side).

Writes benchmarks/results/lira-fashion-mnist.{json,md} and epsilon-fashion-mnist.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from unlearning.architectures import build_model  # noqa: E402
from unlearning.data.datasets import load_fashion_mnist  # noqa: E402
from unlearning.lab import LabConfig, prepare_seed  # noqa: E402
from unlearning.loops import evaluate, predict_logits  # noqa: E402
from unlearning.methods import get_method  # noqa: E402
from unlearning.training import Recipe, train  # noqa: E402
from unlearning.verification.mia import logit_confidence  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SPEC = {"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}}
DELTA = 1e-5
CPU = torch.device("cpu")


def statistic(model: torch.nn.Module, samples: Any) -> np.ndarray:
    logits = predict_logits(model, samples, CPU).double()
    return logit_confidence(logits, samples.y.cpu()).numpy()


def _says_positive(value: np.ndarray, mu_p: np.ndarray, sd_p: np.ndarray, mu_n: np.ndarray,
                   sd_n: np.ndarray) -> np.ndarray:
    """Per-sample Gaussian likelihood ratio: is ``value`` likelier under the positive side?"""
    log_p = -0.5 * ((value - mu_p) / sd_p) ** 2 - np.log(sd_p)
    log_n = -0.5 * ((value - mu_n) / sd_n) ** 2 - np.log(sd_n)
    return log_p > log_n


def lira_accuracy(positive: np.ndarray, negative: np.ndarray) -> float:
    """``positive``/``negative``: [K, n] statistics. Leave-one-pair-out per-sample Gaussian
    likelihood ratio; share of held-out statistics assigned to the right side."""
    k = positive.shape[0]
    correct = 0
    for j in range(k):
        rest = [i for i in range(k) if i != j]
        fitted = (positive[rest].mean(0), positive[rest].std(0) + 1e-3,
                  negative[rest].mean(0), negative[rest].std(0) + 1e-3)
        correct += int(_says_positive(positive[j], *fitted).sum())
        correct += int((~_says_positive(negative[j], *fitted)).sum())
    return correct / (2 * positive.size)


def sample_epsilon(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """Largest epsilon over thresholds and both directions for one sample's K + K values."""
    k_u, k_r = len(unlearned), len(retrained)
    best = 0.0
    for threshold in np.concatenate([unlearned, retrained]):
        for sign in (1.0, -1.0):
            # the attack says "unlearned" when sign * value >= sign * threshold
            fnr = (np.sum(sign * unlearned < sign * threshold) + 0.5) / (k_u + 1)
            fpr = (np.sum(sign * retrained >= sign * threshold) + 0.5) / (k_r + 1)
            for a, b in ((1 - DELTA - fpr, fnr), (1 - DELTA - fnr, fpr)):
                if a > 0:
                    best = max(best, math.log(a / b))
    return best


def forgetting_quality(epsilons: np.ndarray) -> float:
    bins = np.floor(epsilons / 0.5)
    return float(np.mean(2.0 ** -bins))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--data-dir", type=Path, default=REPO / ".lethe")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    recipe = Recipe(epochs=args.epochs, lr=0.05, batch_size=64, weight_decay=0.0)
    config = LabConfig(dataset="fashion-mnist", arch="cnn-small", scenario="subset",
                       methods=(), seeds=(0,), data_dir=args.data_dir, recipe=recipe,
                       train_size=args.train_size, holdout_size=2000, retain_eval_size=2000,
                       forget_fraction=args.forget_fraction)
    data = prepare_seed(config, load_fashion_mnist(args.data_dir), seed=0)
    match = get_method("match")
    sides: dict[str, list[np.ndarray]] = {"original": [], "unlearned": [], "retrained": []}
    accuracy: dict[str, list[dict[str, float]]] = {"unlearned": [], "retrained": []}
    match_runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for k in range(1, args.pairs + 1):
        original = build_model(SPEC)
        train(original, data.train, recipe, device=CPU, seed=k)
        retrained = build_model(SPEC)
        train(retrained, data.retain, recipe, device=CPU, seed=k)
        result = match.unlearn(original, retain=data.retain, forget=data.forget,
                               unseen=data.unseen, scenario=data.scenario, device="cpu",
                               seed=k)
        for name, model in (("original", original), ("unlearned", result.model),
                            ("retrained", retrained)):
            sides[name].append(statistic(model, data.forget))
        for name, model in (("unlearned", result.model), ("retrained", retrained)):
            accuracy[name].append({"retain": evaluate(model, data.retain_eval, CPU)["accuracy"],
                                   "test": evaluate(model, data.test, CPU)["accuracy"]})
        match_runs.append({"pair": k, "steps": result.steps, "stopped": result.details["stopped"],
                           "cpu_seconds": round(result.cpu_seconds, 2)})
        print(f"pair {k}/{args.pairs}: match {result.steps} steps ({result.details['stopped']}), "
              f"{time.perf_counter() - started:.0f} s so far", flush=True)

    stats = {name: np.stack(values) for name, values in sides.items()}
    lira = {"match_vs_retrain": lira_accuracy(stats["unlearned"], stats["retrained"]),
            "original_vs_retrain": lira_accuracy(stats["original"], stats["retrained"])}
    epsilons = np.array([sample_epsilon(stats["unlearned"][:, i], stats["retrained"][:, i])
                         for i in range(stats["unlearned"].shape[1])])
    control = np.array([sample_epsilon(stats["original"][:, i], stats["retrained"][:, i])
                        for i in range(stats["original"].shape[1])])
    mean = {side: {key: float(np.mean([a[key] for a in accuracy[side]]))
                   for key in ("retain", "test")} for side in accuracy}
    utility = (mean["unlearned"]["retain"] / mean["retrained"]["retain"]
               * mean["unlearned"]["test"] / mean["retrained"]["test"])
    quality, control_quality = forgetting_quality(epsilons), forgetting_quality(control)
    setup = {"pairs": args.pairs, "train_size": len(data.train), "n_forget": len(data.forget),
             "recipe": recipe.to_dict(), "arch": SPEC, "machine": machine(),
             "seconds": round(time.perf_counter() - started, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lira_result = {**setup, "accuracy": lira, "match_runs": match_runs}
    eps_result = {**setup, "delta": DELTA, "forgetting_quality": quality,
                  "utility_factor": utility, "score": quality * utility,
                  "epsilon_median": float(np.median(epsilons)),
                  "epsilon_max": float(epsilons.max()),
                  "control_original": {"forgetting_quality": control_quality,
                                       "epsilon_median": float(np.median(control))},
                  "mean_accuracy": mean}
    (args.out_dir / "lira-fashion-mnist.json").write_text(json.dumps(lira_result, indent=2))
    (args.out_dir / "epsilon-fashion-mnist.json").write_text(json.dumps(eps_result, indent=2))
    head = (f"Machine: {setup['machine']['cpu']}, {setup['machine']['cores']} cores, torch "
            f"{setup['machine']['torch']}. Fashion-MNIST, cnn-small, {setup['train_size']} "
            f"training images ({recipe.epochs} epochs, lr {recipe.lr}), forget set of "
            f"{setup['n_forget']} random samples, {args.pairs} model pairs (seeds 1..{args.pairs}"
            f"), {setup['seconds']:.0f} s.\n")
    steps = [run["steps"] for run in match_runs]
    (args.out_dir / "lira-fashion-mnist.md").write_text(
        "# U-LiRA-style per-sample audit\n\n" + head +
        "\n| models compared on the forget set | per-sample LR attack accuracy |\n|---|---|\n"
        f"| match-unlearned vs retrained | {lira['match_vs_retrain']:.3f} |\n"
        f"| original (no unlearning) vs retrained | {lira['original_vs_retrain']:.3f} |\n\n"
        f"0.5: cannot tell them apart. match stopped after {min(steps)}-{max(steps)} steps "
        f"(median {int(np.median(steps))}).\n")
    (args.out_dir / "epsilon-fashion-mnist.md").write_text(
        "# NeurIPS-2023 epsilon score\n\n" + head +
        f"\n| models | forgetting quality F | median epsilon | utility factor | score |\n"
        "|---|---|---|---|---|\n"
        f"| match vs retrain | {quality:.3f} | {np.median(epsilons):.2f} | {utility:.3f} | "
        f"{quality * utility:.3f} |\n"
        f"| original vs retrain (control) | {control_quality:.3f} | {np.median(control):.2f} | "
        "- | - |\n\n"
        f"Rates are add-one-half smoothed over {args.pairs} models per side, so epsilon cannot "
        f"exceed about {math.log((args.pairs + 1) / 0.5):.1f}; the challenge used 512 per side.\n")
    print((args.out_dir / "lira-fashion-mnist.md").read_text())
    print((args.out_dir / "epsilon-fashion-mnist.md").read_text())


if __name__ == "__main__":
    main()
