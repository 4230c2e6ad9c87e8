"""Deep audit of every unlearning method against its own controls: a U-LiRA-style per-sample
likelihood-ratio test, the NeurIPS-2023 unlearning challenge's epsilon score and RTE
(docs/methods.md, 'Deep audit: per-sample likelihood-ratio test' and 'Deep audit: NeurIPS-2023
epsilon score').

    .venv/bin/python benchmarks/deep_audit.py [--pairs 16] [--train-size 2000] [--methods ...]
                                              [--references 16] [--tag T] [--resume]

World. Fashion-MNIST, cnn-small, trained for 40 epochs (lr 0.05, batch 64, no weight decay).
From the official training split (split seed 0): a fixed forget set F of forget_fraction x
train_size random samples and a retain pool of 2 x (train_size - |F|) other samples. From the
official test split: a holdout of 2 000 images, halved into the `unseen` slice handed to the
methods and an audit half nothing here reads, and the other 8 000 images as the test set. F,
the unseen slice and the test set are the same for every pair: the per-sample statistics
compare the same samples across models.

Pairs. The data are resampled between pairs as well as the seeds: pair k's retain set R_k is
a random (train_size - |F|) subset of the pool drawn with seed k. The original O_k trains on
R_k + F with seed k; the retrain A_k on R_k with seed k (the side everything is compared with,
and RTE's clock); the control retrain B_k on R_k with seed 10 000 + k.

References. One reference set shared by all pairs (`--references`, k = 16; 0: none), trained
once with `train_references` on pool + F (the training positions) with the unseen slice as the
holdout: the references train on random halves of pool + F, as a deployed model's references
train on random halves of its own training data. Every method is handed the method half's OUT
values of phi for F and for the unseen slice (`MethodReferences`); only `match` reads them.

Runs. Per pair, every method in `--methods` (default: every registered method but `retrain`)
unlearns O_k with retain R_k, forget F, the unseen slice, the original recipe, seed k, on the
CPU, `min_steps` left at its default. Recorded per model: phi on F, the logit-scaled
confidence ``log p_y(x) - log(1 - p_y(x))``; retain accuracy on a fixed draw of up to 2 000
samples of R_k; forget accuracy on F; test accuracy; for the methods wall and CPU seconds,
steps and why they stopped; A_k's and B_k's training is timed too.

Metrics, each against the retrains A over the K pairs and computed the same way for every
method and for two controls: retrain-vs-retrain (B against A: the floor, the best reachable
at this K) and original-vs-retrain (O against A: the ceiling, no unlearning at all).

* Per-sample LR accuracy (U-LiRA): for each held-out pair j, per sample, Gaussians are fitted
  to phi under the other K-1 candidates and the other K-1 retrains; the held-out candidate's
  and retrain's values are each classified by the likelihood ratio. Accuracy over all (sample,
  pair, side) decisions: 0.5 means the attacker cannot tell the candidate from retraining.
* Per-sample spread: each forget sample's own accuracy over its 2K held-out decisions; the
  share of forget samples above 0.7.
* Epsilon score: per sample, threshold attacks on phi under the K candidates vs the K
  retrains give false-positive and false-negative rates (add-one-half smoothed, so K models
  cannot claim a zero rate); ``eps = max(log((1 - d - FPR) / FNR), log((1 - d - FNR) / FPR))``
  over thresholds and both directions, d = 1e-5. Forgetting quality ``F = mean 2^-n(eps)``
  with n the index of eps's 0.5-wide bin; normalised F = F / F(retrain-vs-retrain); the score
  is ``F x (RA / RA_A) x (TA / TA_A)`` with mean accuracies. eps cannot exceed
  ``log((K + 1) / 0.5)`` (3.5 at K = 16; the challenge used 512 models per side).
* RA, FA, TA: mean and sd over the pairs. RTE per pair = A_k's training seconds / the
  method's seconds; mean, min, max and sd over the pairs, on wall and on CPU seconds.

Every raw array is checkpointed after the references and after every pair to
benchmarks/results/deep-audit-<tag>.npz; `--resume` continues an interrupted run from it.
Writes deep-audit-<tag>.json and .md and, where matplotlib imports, deep-audit-<tag>.png
(normalised F against RTE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from unlearning.architectures import build_model  # noqa: E402
from unlearning.data.datasets import load_fashion_mnist  # noqa: E402
from unlearning.loops import SampleSet, evaluate, predict_logits  # noqa: E402
from unlearning.methods import METHODS, get_method  # noqa: E402
from unlearning.methods.base import MethodReferences  # noqa: E402
from unlearning.runtime import seed_everything  # noqa: E402
from unlearning.scenarios import Scenario  # noqa: E402
from unlearning.training import Recipe, train  # noqa: E402
from unlearning.verification.mia import logit_confidence  # noqa: E402
from unlearning.verification.references import (  # noqa: E402
    METHOD,
    ReferenceOutput,
    ReferenceStatistics,
    check_reference_count,
    train_references,
)

RESULTS = REPO / "benchmarks" / "results"
SPEC = {"name": "cnn-small", "kwargs": {"in_channels": 1, "num_classes": 10}}
DELTA = 1e-5
CPU = torch.device("cpu")
SPLIT_SEED = 0  # F, the pool, the unseen slice and the test set
CONTROL_SEED = 10_000  # B_k trains with seed CONTROL_SEED + k
REFERENCE_SEED = 20_000  # the reference plan's seed (models: REFERENCE_SEED * 1000 + index)
HOLDOUT_SIZE = 2000  # from the official test split, halved into unseen + audit
RETAIN_EVAL_SIZE = 2000
SPREAD_THRESHOLD = 0.7
ORIGINAL, RETRAIN, CONTROL = "original", "retrain", "retrain-control"
CONTROL_ROWS = {CONTROL: "retrain-vs-retrain", ORIGINAL: "original-vs-retrain"}
DEFAULT_METHODS = tuple(name for name in METHODS if name != "retrain")
RESAMPLING = ("F, the unseen slice and the test set are fixed; pair k's retain set R_k is a "
              "random (train_size - |F|) subset of a pool of 2 x (train_size - |F|) training "
              "images, drawn with seed k. O_k trains on R_k + F with seed k, A_k on R_k with "
              f"seed k, B_k on R_k with seed {CONTROL_SEED} + k.")


def statistic(model: nn.Module, samples: SampleSet) -> np.ndarray:
    logits = predict_logits(model, samples, CPU).double()
    return logit_confidence(logits, samples.y.cpu()).numpy()


def _says_positive(value: np.ndarray, mu_p: np.ndarray, sd_p: np.ndarray, mu_n: np.ndarray,
                   sd_n: np.ndarray) -> np.ndarray:
    """Per-sample Gaussian likelihood ratio: is ``value`` likelier under the positive side?"""
    log_p = -0.5 * ((value - mu_p) / sd_p) ** 2 - np.log(sd_p)
    log_n = -0.5 * ((value - mu_n) / sd_n) ** 2 - np.log(sd_n)
    return np.asarray(log_p > log_n)


def lira_correct(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``positive``/``negative``: [K, n] statistics. Leave-one-pair-out per-sample Gaussian
    likelihood ratio; per sample, how many of its 2K held-out statistics are assigned to the
    right side."""
    k = positive.shape[0]
    correct = np.zeros(positive.shape[1], dtype=np.int64)
    for j in range(k):
        rest = [i for i in range(k) if i != j]
        fitted = (positive[rest].mean(0), positive[rest].std(0) + 1e-3,
                  negative[rest].mean(0), negative[rest].std(0) + 1e-3)
        correct += _says_positive(positive[j], *fitted)
        correct += ~_says_positive(negative[j], *fitted)
    return correct


def lira_accuracy(positive: np.ndarray, negative: np.ndarray) -> float:
    """Share of all held-out (sample, pair, side) decisions that are right."""
    return int(lira_correct(positive, negative).sum()) / (2 * positive.size)


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


def epsilon_cap(k: int) -> float:
    return math.log((k + 1) / 0.5)


# -- the world ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    forget: SampleSet
    pool: SampleSet
    unseen: SampleSet
    test: SampleSet
    n_retain: int


def build_world(data_dir: Path, train_size: int, forget_fraction: float) -> World:
    dataset = load_fashion_mnist(data_dir)
    everything = SampleSet(dataset.images, dataset.labels)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train_index = torch.nonzero(~dataset.official_test).flatten()
    test_index = torch.nonzero(dataset.official_test).flatten()
    n_forget = round(forget_fraction * train_size)
    n_retain = train_size - n_forget
    if not 0 < n_forget < train_size:
        raise SystemExit(f"--forget-fraction {forget_fraction} of {train_size} leaves no "
                         "forget or no retain set")
    if n_forget + 2 * n_retain > len(train_index):
        raise SystemExit(f"F + a pool of 2 x {n_retain} needs {n_forget + 2 * n_retain} "
                         f"training images; Fashion-MNIST has {len(train_index)}")
    order = train_index[torch.randperm(len(train_index), generator=generator)]
    test_order = test_index[torch.randperm(len(test_index), generator=generator)]
    return World(forget=everything.subset(order[:n_forget].sort().values),
                 pool=everything.subset(order[n_forget:n_forget + 2 * n_retain].sort().values),
                 unseen=everything.subset(test_order[:HOLDOUT_SIZE // 2]),
                 test=everything.subset(test_order[HOLDOUT_SIZE:]), n_retain=n_retain)


def retain_set(world: World, pair: int) -> tuple[SampleSet, SampleSet]:
    """R_k and its fixed retain-eval draw, both from pair ``pair``'s seed."""
    generator = torch.Generator().manual_seed(pair)
    chosen = torch.randperm(len(world.pool), generator=generator)[:world.n_retain]
    retain = world.pool.subset(chosen.sort().values)
    return retain, retain.sample(RETAIN_EVAL_SIZE, generator)


def trained(data: SampleSet, recipe: Recipe, seed: int) -> tuple[nn.Module, dict[str, float]]:
    seed_everything(seed)
    model = build_model(SPEC)
    timing = train(model, data, recipe, device=CPU, seed=seed)
    return model.eval(), timing


# -- the checkpoint ----------------------------------------------------------------------------


class Checkpoint:
    """Every raw array of the run: the references' OUT statistics (as far as trained), phi on
    F per arm per pair, and each pair's accuracies and timings."""

    def __init__(self, path: Path, config: dict[str, Any], n_forget: int, n_train: int,
                 n_holdout: int) -> None:
        self.path, self.config = path, config
        k = config["references"]
        self.ref_train = np.full((k, n_train), np.nan)
        self.ref_holdout = np.full((k, n_holdout), np.nan)
        self.ref_done: list[int] = []
        self.ref_seconds: list[float] = []
        self.n_forget = n_forget
        self.phi: dict[str, list[np.ndarray]] = {}
        self.runs: list[dict[str, Any]] = []

    def load(self) -> None:
        with np.load(self.path) as saved:
            config = json.loads(str(saved["config"]))
            if config != self.config:
                differing = sorted(key for key in {*config, *self.config}
                                   if config.get(key) != self.config.get(key))
                raise SystemExit(f"{self.path} was written with other settings ({differing}: "
                                 f"{[config.get(k) for k in differing]}); rerun with those "
                                 "or without --resume")
            self.ref_train, self.ref_holdout = saved["ref_train"], saved["ref_holdout"]
            self.ref_done = [int(i) for i in saved["ref_done"]]
            self.ref_seconds = [float(s) for s in saved["ref_seconds"]]
            self.runs = json.loads(str(saved["runs"]))
            self.phi = {key.removeprefix("phi__"): list(saved[key]) for key in saved.files
                        if key.startswith("phi__")}

    def add_reference(self, output: ReferenceOutput) -> None:
        self.ref_train[output.index, output.out_positions] = output.out_phi
        self.ref_holdout[output.index, output.holdout_positions] = output.holdout_phi
        self.ref_done.append(output.index)
        self.ref_seconds.append(output.seconds)
        self.save()

    def add_pair(self, phi: dict[str, np.ndarray], run: dict[str, Any]) -> None:
        for arm, values in phi.items():
            self.phi.setdefault(arm, []).append(values)
        self.runs.append(run)
        self.save()

    def references(self) -> ReferenceStatistics:
        return ReferenceStatistics(self.ref_train, self.ref_holdout)

    def save(self) -> None:
        arrays: dict[str, Any] = {  # Any: savez also takes allow_pickle by keyword
            "config": np.array(json.dumps(self.config)), "runs": np.array(json.dumps(self.runs)),
            "ref_train": self.ref_train, "ref_holdout": self.ref_holdout,
            "ref_done": np.array(self.ref_done, dtype=np.int64),
            "ref_seconds": np.array(self.ref_seconds, dtype=np.float64)}
        for arm, rows in self.phi.items():
            arrays[f"phi__{arm}"] = np.stack(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)
        os.replace(partial, self.path)  # a crash never leaves half a checkpoint


# -- one pair ----------------------------------------------------------------------------------


def measure(model: nn.Module, forget: SampleSet, retain_eval: SampleSet,
            test: SampleSet) -> tuple[np.ndarray, dict[str, float]]:
    return statistic(model, forget), {
        "retain": evaluate(model, retain_eval, CPU)["accuracy"],
        "forget": evaluate(model, forget, CPU)["accuracy"],
        "test": evaluate(model, test, CPU)["accuracy"]}


def run_pair(k: int, world: World, recipe: Recipe, methods: list[str],
             references: MethodReferences | None,
             configs: dict[str, dict[str, Any]] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    started = time.perf_counter()
    retain, retain_eval = retain_set(world, k)
    phi: dict[str, np.ndarray] = {}
    models: dict[str, dict[str, Any]] = {}
    original, _ = trained(SampleSet.concat(retain, world.forget), recipe, seed=k)
    for arm, seed in ((RETRAIN, k), (CONTROL, CONTROL_SEED + k)):
        model, timing = trained(retain, recipe, seed=seed)
        phi[arm], models[arm] = measure(model, world.forget, retain_eval, world.test)
        models[arm].update(seed=seed, steps=int(timing["steps"]),
                           seconds=float(timing["seconds"]),
                           cpu_seconds=float(timing["cpu_seconds"]))
    phi[ORIGINAL], models[ORIGINAL] = measure(original, world.forget, retain_eval, world.test)
    models[ORIGINAL]["seed"] = k
    for name in methods:
        result = get_method(name).unlearn(
            original, retain=retain, forget=world.forget, unseen=world.unseen,
            original_recipe=recipe, scenario=Scenario("subset"), references=references,
            config=METHODS[name].Config(**(configs or {}).get(name, {})),
            device="cpu", seed=k)
        phi[name], models[name] = measure(result.model, world.forget, retain_eval, world.test)
        stopped = result.details.get("stopped")
        models[name].update(steps=int(result.steps), seconds=float(result.seconds),
                            cpu_seconds=float(result.cpu_seconds),
                            stopped=None if stopped is None else str(stopped))
    return phi, {"pair": k, "n_retain_eval": len(retain_eval),
                 "seconds": round(time.perf_counter() - started, 2), "models": models}


# -- metrics -----------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def arm_metrics(arm: str, phi: dict[str, np.ndarray], runs: list[dict[str, Any]],
                floor: float | None) -> dict[str, Any]:
    """One method's (or control's) metrics against the retrains A over the pairs."""
    candidate, retrained = phi[arm], phi[RETRAIN]
    correct = lira_correct(candidate, retrained)
    per_sample = correct / (2 * candidate.shape[0])
    epsilons = np.array([sample_epsilon(candidate[:, i], retrained[:, i])
                         for i in range(candidate.shape[1])])
    quality = forgetting_quality(epsilons)
    accuracy = {key: _spread([run["models"][arm][key] for run in runs])
                for key in ("retain", "forget", "test")}
    reference = {key: statistics.fmean([run["models"][RETRAIN][key] for run in runs])
                 for key in ("retain", "test")}
    means = {key: statistics.fmean([run["models"][arm][key] for run in runs])
             for key in ("retain", "test")}
    utility = means["retain"] / reference["retain"] * means["test"] / reference["test"]
    timed = arm != ORIGINAL
    rte = {clock: _spread([run["models"][RETRAIN][clock] / run["models"][arm][clock]
                           for run in runs if run["models"][arm][clock] > 0] if timed else [])
           for clock in ("seconds", "cpu_seconds")}
    steps = [run["models"][arm]["steps"] for run in runs] if timed else []
    stopped: dict[str, int] = {}
    for run in runs:
        reason = run["models"][arm].get("stopped")
        if reason is not None:
            stopped[reason] = stopped.get(reason, 0) + 1
    return {
        "lira_accuracy": int(correct.sum()) / (2 * candidate.size),
        "per_sample_accuracy": {"share_above_0.7": float(np.mean(per_sample > SPREAD_THRESHOLD)),
                                "median": float(np.median(per_sample)),
                                "max": float(per_sample.max())},
        "forgetting_quality": quality,
        "normalised_forgetting_quality": quality / floor if floor else None,
        "epsilon_median": float(np.median(epsilons)), "epsilon_max": float(epsilons.max()),
        "utility_factor": utility, "score": quality * utility,
        "accuracy": accuracy, "rte_wall": rte["seconds"], "rte_cpu": rte["cpu_seconds"],
        "steps_median": float(np.median(steps)) if steps else None, "stopped": stopped,
    }


def all_metrics(phi: dict[str, np.ndarray], runs: list[dict[str, Any]],
                methods: list[str]) -> dict[str, dict[str, Any]]:
    floor = arm_metrics(CONTROL, phi, runs, None)
    floor["normalised_forgetting_quality"] = 1.0
    metrics = {name: arm_metrics(name, phi, runs, floor["forgetting_quality"])
               for name in methods}
    metrics[CONTROL_ROWS[CONTROL]] = floor
    metrics[CONTROL_ROWS[ORIGINAL]] = arm_metrics(ORIGINAL, phi, runs,
                                                  floor["forgetting_quality"])
    return metrics


# -- outputs -----------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy(cell: dict[str, float | None]) -> str:
    return "-" if cell["mean"] is None else f"{cell['mean']:.3f} ± {cell['sd']:.3f}"


def _rte(cell: dict[str, float | None]) -> str:
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.1f} ({cell['min']:.1f}–{cell['max']:.1f})"


def markdown(result: dict[str, Any]) -> str:
    setup, metrics = result["setup"], result["metrics"]
    k = setup["pairs"]
    host = setup["machine"]
    recipe = setup["recipe"]
    refs = setup["references"]
    controls = list(CONTROL_ROWS.values())
    rows = sorted((name for name in metrics if name not in controls),
                  key=lambda name: -(metrics[name]["normalised_forgetting_quality"] or 0.0))
    lines = [
        f"# Deep audit: every method against its own controls ({setup['tag']})", "",
        f"Machine: {host['cpu']}, {host['cores']} cores, torch {host['torch']} "
        f"({host['torch_threads']} threads). Fashion-MNIST, cnn-small, {recipe['epochs']} "
        f"epochs (lr {recipe['lr']}, batch {recipe['batch_size']}, weight decay "
        f"{recipe['weight_decay']}); {k} pairs; |F| = {setup['n_forget']} fixed random "
        f"training images, |R_k| = {setup['n_retain']} drawn per pair from a pool of "
        f"{setup['n_pool']}; unseen slice {setup['n_unseen']}, test set {setup['n_test']}. "
        f"{setup['resampling']} References: "
        + (f"{refs['k']} trained once on random halves of pool + F ({refs['seconds']:.0f} s), "
           "the method half handed to every method."
           if refs["k"] else "none.")
        + "".join(f" {name} with {json.dumps(values)}."
                  for name, values in setup.get("configs", {}).items())
        + f" {setup['seconds']:.0f} s in all.", "",
        "Every row is measured against the retrains A_k. Per-sample LR accuracy: 0.5 cannot "
        "tell the row from retraining; share > 0.7: forget samples whose own held-out LR "
        "accuracy exceeds 0.7; F: forgetting quality, normalised by retrain-vs-retrain's; "
        "score: F x RA/RA_A x TA/TA_A; RA, FA, TA: mean ± sd over pairs; RTE: A_k's wall "
        "seconds / the row's, mean (min–max) over pairs (CPU-second RTE in the JSON).", "",
        "| method | per-sample LR acc | share > 0.7 | F | normalised F | score | RA | FA | TA "
        "| RTE mean (min–max) | steps median |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [*rows, *controls]:
        m = metrics[name]
        label = f"{name} (control)" if name in controls else name
        lines.append(
            f"| {label} | {m['lira_accuracy']:.3f} | "
            f"{m['per_sample_accuracy']['share_above_0.7']:.3f} | "
            f"{m['forgetting_quality']:.3f} | {_number(m['normalised_forgetting_quality'])} | "
            f"{m['score']:.3f} | {_accuracy(m['accuracy']['retain'])} | "
            f"{_accuracy(m['accuracy']['forget'])} | {_accuracy(m['accuracy']['test'])} | "
            f"{_rte(m['rte_wall'])} | {_number(m['steps_median'], 0)} |")
    lines += [
        "", f"Rates are add-one-half smoothed over {k} models per side, so eps cannot exceed "
        f"log((K + 1) / 0.5) = {epsilon_cap(k):.2f} at K = {k} (the challenge used 512 per "
        "side): F is coarse, so read it against the controls, retrain-vs-retrain (the best "
        "reachable) and original-vs-retrain (no unlearning).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """normalised F against RTE (log scale); False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = result["metrics"]
    figure, axes = plt.subplots(figsize=(7, 5))
    for name, m in metrics.items():
        rte, quality = m["rte_wall"], m["normalised_forgetting_quality"]
        if rte["mean"] is None or quality is None:
            continue
        control = name in CONTROL_ROWS.values()
        axes.errorbar([rte["mean"]], [quality],
                      xerr=[[rte["mean"] - rte["min"]], [rte["max"] - rte["mean"]]],
                      fmt="o", mfc="none" if control else None, capsize=3,
                      color="grey" if control else None)
        axes.annotate(f"{name} (control)" if control else name, (rte["mean"], quality),
                      textcoords="offset points", xytext=(5, 5), fontsize=8)
    ceiling = metrics[CONTROL_ROWS[ORIGINAL]]["normalised_forgetting_quality"]
    if ceiling is not None:
        axes.axhline(ceiling, color="grey", linestyle="--", linewidth=1,
                     label="original-vs-retrain (no unlearning)")
        axes.legend(fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("RTE: retrain wall seconds / method wall seconds (min–max over pairs)")
    axes.set_ylabel("normalised forgetting quality F / F(retrain-vs-retrain)")
    axes.set_title(f"Deep audit, {result['setup']['pairs']} pairs ({result['setup']['tag']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# -- main --------------------------------------------------------------------------------------


def output(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # a tag may hold dots


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--references", type=int, default=16,
                        help="reference models (a multiple of 4 from 8 to 16); 0: none")
    parser.add_argument("--config", action="append", default=[], metavar="METHOD=JSON",
                        help="non-default settings of a method, e.g. "
                             "'match={\"per_sample\": \"on\"}' (repeatable)")
    parser.add_argument("--tag", default="fashion-mnist-cnn-small")
    parser.add_argument("--resume", action="store_true",
                        help="continue from deep-audit-<tag>.npz in --out-dir")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".lethe")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    unknown = [name for name in args.methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    if args.references:
        try:
            check_reference_count(args.references)
        except ValueError as error:
            parser.error(str(error))
    if args.pairs < 3:
        parser.error("--pairs must be at least 3 (leave-one-out fits need 2 per side)")
    configs: dict[str, dict[str, Any]] = {}
    for item in args.config:
        name, _, body = item.partition("=")
        try:
            configs[name] = json.loads(body)
            METHODS[name].Config(**configs[name])
        except (KeyError, TypeError, ValueError) as error:
            parser.error(f"--config {item!r}: {error}")
    args.configs = configs
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods: list[str] = list(dict.fromkeys(args.methods))
    recipe = Recipe(epochs=args.epochs, lr=0.05, batch_size=64, weight_decay=0.0)
    world = build_world(args.data_dir, args.train_size, args.forget_fraction)
    n_forget = len(world.forget)
    reference_train = SampleSet.concat(world.forget, world.pool)  # F's positions: 0..|F|-1
    config = {"train_size": args.train_size, "forget_fraction": args.forget_fraction,
              "recipe": recipe.to_dict(), "arch": SPEC, "methods": methods,
              "references": args.references, "configs": args.configs,
              "split_seed": SPLIT_SEED,
              "control_seed": CONTROL_SEED, "reference_seed": REFERENCE_SEED}
    stem = args.out_dir / f"deep-audit-{args.tag}"
    checkpoint = Checkpoint(output(stem, ".npz"), config, n_forget, len(reference_train),
                            len(world.unseen))
    if args.resume and checkpoint.path.exists():
        checkpoint.load()
        print(f"resuming {checkpoint.path}: {len(checkpoint.ref_done)}/{args.references} "
              f"references, {len(checkpoint.runs)} pairs done", flush=True)
    elif args.resume:
        print(f"nothing to resume at {checkpoint.path}; starting afresh", flush=True)
    host = machine()
    started = time.perf_counter()

    references = None
    if args.references:
        missing = args.references - len(checkpoint.ref_done)
        if missing:
            print(f"training {missing} reference models on halves of pool + F "
                  f"({len(reference_train)} images)", flush=True)

        def report(output: ReferenceOutput) -> None:
            checkpoint.add_reference(output)
            print(f"reference {output.index + 1}/{args.references}: {output.seconds:.0f} s, "
                  f"{time.perf_counter() - started:.0f} s so far", flush=True)

        # train_references builds each model before seeding its training: seed the build by
        # the reference's index, so a resumed run initialises the rest as a whole run would
        pending = iter([i for i in range(args.references) if i not in checkpoint.ref_done])

        def factory() -> nn.Module:
            seed_everything(REFERENCE_SEED * 1000 + next(pending))
            return build_model(SPEC)

        train_references(factory, recipe, train_set=reference_train,
                         holdout=world.unseen, k=args.references, seed=REFERENCE_SEED,
                         device=CPU, skip=set(checkpoint.ref_done), on_reference=report)
        forget_out, unseen_out = checkpoint.references().out_values(
            METHOD, train=np.arange(n_forget))
        references = MethodReferences(forget=forget_out, unseen=unseen_out)

    for k in range(len(checkpoint.runs) + 1, args.pairs + 1):
        phi, run = run_pair(k, world, recipe, methods, references, args.configs)
        checkpoint.add_pair(phi, run)
        summary = ", ".join(f"{name} {run['models'][name]['steps']} steps "
                            f"{run['models'][name]['seconds']:.1f} s" for name in methods)
        print(f"pair {k}/{args.pairs}: {run['seconds']:.0f} s (retrain "
              f"{run['models'][RETRAIN]['seconds']:.1f} s; {summary}); "
              f"{time.perf_counter() - started:.0f} s so far", flush=True)

    runs = checkpoint.runs[:args.pairs]
    phi_all = {arm: np.stack(rows[:args.pairs]) for arm, rows in checkpoint.phi.items()}
    pair_seconds = [run["seconds"] for run in runs]
    setup = {
        "tag": args.tag, "pairs": len(runs), "machine": host, "dataset": "fashion-mnist",
        "arch": SPEC, "recipe": recipe.to_dict(), "methods": methods,
        "configs": args.configs, "train_size": args.train_size,
        "forget_fraction": args.forget_fraction,
        "n_forget": n_forget, "n_retain": world.n_retain, "n_pool": len(world.pool),
        "n_unseen": len(world.unseen), "n_test": len(world.test),
        "retain_eval": f"a fixed draw of up to {RETAIN_EVAL_SIZE} samples of R_k, seed k",
        "seeds": {"split": SPLIT_SEED, "original": "k", "retrain": "k",
                  "retrain_control": f"{CONTROL_SEED} + k", "method": "k",
                  "retain_draw": "k", "references": REFERENCE_SEED},
        "resampling": RESAMPLING,
        "references": {"k": args.references, "seed": REFERENCE_SEED,
                       "trained_on": f"random halves of pool + F ({len(reference_train)})",
                       "holdout": "the unseen slice", "handed_to_methods": "the method half",
                       "seconds": round(sum(checkpoint.ref_seconds), 1)},
        "epsilon_cap": epsilon_cap(len(runs)), "delta": DELTA,
        "pair_seconds": {"mean": statistics.fmean(pair_seconds), "min": min(pair_seconds),
                         "max": max(pair_seconds), "total": sum(pair_seconds)},
        "seconds": round(sum(pair_seconds) + sum(checkpoint.ref_seconds), 1),
    }
    result = {"setup": setup, "metrics": all_metrics(phi_all, runs, methods), "runs": runs}
    output(stem, ".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    output(stem, ".md").write_text(text)
    print(text)
    if plot(result, output(stem, ".png")):
        print(f"wrote {stem}.json, .md, .png")
    else:
        print(f"wrote {stem}.json and .md; matplotlib is not importable, so no plot")


if __name__ == "__main__":
    main()
