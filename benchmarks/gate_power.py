"""Gate power: how often the per-request membership test (reference models, offline LiRA)
flags data subjects a model still remembers, how often it wrongly refuses subjects a model
never saw, and how that compares with today's population+KS gate; plus what the reference
job costs.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gate_power [--worlds demo,6000]

Two worlds drawn from Fashion-MNIST's official training pool, cnn-small trained with the demo's
recipe (30 epochs, lr 0.05, no weight decay): ``demo`` has the demo world's sizes (2 800
training and 1 200 holdout images), ``6000`` has 6 000 training and 2 000 holdout images; both
have 2 000 test images from the official test split. The holdout is cut in two halves: the
``unseen`` half (what ``match`` matches against) and the ``audit`` half (the test's null
and the population attack's non-members), as the worker does (docs/methods.md, "Data
slices"). 200 random subjects own 5 random training samples each (1 000 samples, disjoint).

Models per world: the original (all training samples), a retrain without the 1 000 subject
samples (same recipe and seed: it never saw any subject) and 16 reference models (8
complementary pairs, ``train_references``). A set of ``k`` references has ``k / 2`` gate
models, and the gate half of the service's k=8 or k=16 plan is the first 4 or 8 models of the
same plan, so one 16-model run gives every k: the gate half is models ``0 .. k/2 - 1``
(k=16: 4 OUT values per sample, k=8: 2, k=4: 1, k=2: model 0 alone, so only the half of the
training samples model 0 did not train on are testable). k=2 and 4 need
``per_sample.MIN_OUT`` lowered to 1, which this benchmark does only while testing them (with
one OUT value the pooled spread cannot be estimated and is 1.0; p-values do not depend on it).
``match`` runs (defaults, escalation level 0) on a few batches only, each costing a run.

Measured: (a) per subject, the share with p < alpha (no Benjamini-Hochberg) under the original
(power), the retrain (false refusals) and match's candidate, against today's gate for one
subject (the KS test on its 5 samples; the population attack needs 10); (b) per batch of 10
and 50 subjects (random partitions of the 200), the share refused by the per-sample gate (any
request flagged after BH at alpha) and by the population+KS gate (``decide`` failing on a
membership reason; the batch passes or fails as a whole); (c) AUC and TPR at 1 %/5 % FPR of the
per-sample score against the original's raw statistic (members: training samples, non-members:
the audit slice); (d) the smallest mean shift detectable for 5 samples and the p-value
resolution; (e) the reference job's seconds over one training of the original.

The gate reports are built from each model's logits computed once (the same engine functions
``build_verification_report`` calls: ``attack_features``, ``population_mia``, ``ks_forget_test``,
then ``decide``), checked against ``build_verification_report`` on one batch and one subject;
``per_sample.group_null`` is replaced by a copy that caches the random group draws, which
depend only on the null's size, the group size and the seed (checked equal to the original).

Models and statistics are cached under .lethe/bench-cache/gate-power/, so a rerun is quick
(training is most of the first run: about 35 minutes on one thread). Writes
benchmarks/results/gate-power-fashion-mnist.{json,md} after each world; ``--render`` rewrites
the markdown from the JSON. ``--worlds trial --subjects 40 --epochs 2 --out /tmp/trial`` runs
the whole benchmark on a tiny world in half a minute: a check of the code, not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from unlearning.architectures import build_model  # noqa: E402
from unlearning.data.datasets import ImageDataset, load_fashion_mnist  # noqa: E402
from unlearning.loops import SampleSet, evaluate, predict_logits  # noqa: E402
from unlearning.methods import get_method  # noqa: E402
from unlearning.scenarios import Scenario  # noqa: E402
from unlearning.training import Recipe, train  # noqa: E402
from unlearning.verification import per_sample  # noqa: E402
from unlearning.verification.mia import (  # noqa: E402
    attack_features,
    ks_forget_test,
    logit_confidence,
    per_sample_loss,
    population_mia,
)
from unlearning.verification.references import (  # noqa: E402
    ReferenceOutput,
    ReferenceStatistics,
    train_references,
)
from unlearning.verification.report import (  # noqa: E402
    Thresholds,
    VerificationReport,
    build_verification_report,
    decide,
)
from unlearning.weights import load_weights, save_weights  # noqa: E402

BATCH_COLUMNS = ("k16-pooled", "k8-pooled", "k16-per-sample", "k16-pooled-models8-15",
                 "k16-pooled-centred")
CACHE = REPO / ".lethe" / "bench-cache" / "gate-power"
RECIPE = Recipe(epochs=30, lr=0.05, weight_decay=0.0)
ARCH = {"name": "cnn-small", "kwargs": {"in_channels": 1, "input_size": 28, "num_classes": 10}}
KS = (2, 4, 8, 16)
REFERENCES = 16
CPU = torch.device("cpu")
MEMBERSHIP = ("membership attack", "KS test")


@dataclass(frozen=True)
class Config:
    """One way of reading the 16 models: the gate half of a k-model set is models
    ``first .. first + k/2 - 1``; the service's own is ``first = 0``, the others replicate it
    on models it did not read."""

    k: int
    spread: str = "pooled"
    first: int = 0
    centred: bool = False  # each model's values minus its mean on its OUT training samples

    @property
    def key(self) -> str:
        extra = f"-models{self.first}-{self.first + self.k // 2 - 1}" if self.first else ""
        return f"k{self.k}-{self.spread}{extra}" + ("-centred" if self.centred else "")

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.k // 2)

    @property
    def min_out(self) -> int:
        return 1 if self.k < 8 else per_sample.MIN_OUT

    @property
    def label(self) -> str:
        models = f", models {self.first}–{self.first + self.k // 2 - 1}" if self.first else ""
        centred = ", each model centred (not the engine's)" if self.centred else ""
        return f"per-sample k={self.k}, {self.spread} spread{models}{centred}"

    def out(self, refs: ReferenceStatistics, positions: np.ndarray | None,
            audit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[k/2, n]`` OUT values of the training ``positions`` (all: None) and the audit."""
        train_out, holdout_out = refs.train_phi[self.rows], refs.holdout_phi[self.rows]
        if self.centred:
            level = np.nanmean(train_out, axis=1, keepdims=True)
            train_out, holdout_out = train_out - level, holdout_out - level
        return (train_out if positions is None else train_out[:, positions],
                holdout_out[:, audit])


CONFIGS = ([Config(k) for k in KS] + [Config(16, "per-sample"), Config(8, first=4),
                                       Config(16, first=8)]
           + [Config(4, centred=True), Config(8, centred=True),
              Config(8, first=4, centred=True), Config(16, centred=True),
              Config(16, first=8, centred=True)])


@dataclass(frozen=True)
class WorldSpec:
    name: str
    n_train: int
    n_holdout: int
    n_test: int = 2000
    seed: int = 0

    def digest(self) -> str:
        body = json.dumps({"spec": self.__dict__, "recipe": RECIPE.to_dict(), "arch": ARCH,
                           "references": REFERENCES}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


WORLDS = {"demo": WorldSpec("demo", 2800, 1200), "6000": WorldSpec("6000", 6000, 2000),
          "trial": WorldSpec("trial", 600, 400, n_test=200)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- the cached group null

_PICKS: dict[tuple[int, int, int, int], np.ndarray] = {}
_original_group_null = per_sample.group_null


def cached_group_null(null_scores: np.ndarray, n: int, *, seed: int = 0,
                      draws: int = per_sample.NULL_DRAWS) -> per_sample.GroupNull:
    """``per_sample.group_null`` with its random groups cached: they depend only on the
    number of scored holdout samples, ``n``, the seed and ``draws``."""
    scores = null_scores[~np.isnan(null_scores)]
    if len(scores) < 2 or n > per_sample.NORMAL_ABOVE or n >= len(scores):
        return _original_group_null(null_scores, n, seed=seed, draws=draws)
    key = (len(scores), n, seed, draws)
    if key not in _PICKS:
        rng = np.random.default_rng([seed, n])
        keys = rng.random((draws, len(scores)))
        _PICKS[key] = np.argpartition(keys, n, axis=1)[:, :n]
    mu, sd = float(scores.mean()), float(scores.std(ddof=1))
    return per_sample.GroupNull(n, scores[_PICKS[key]].mean(axis=1), mu, sd / math.sqrt(n))


@contextlib.contextmanager
def min_out(value: int) -> Iterator[None]:
    saved = per_sample.MIN_OUT
    per_sample.MIN_OUT = value
    try:
        yield
    finally:
        per_sample.MIN_OUT = saved


# ---------------------------------------------------------------- the world

@dataclass
class World:
    spec: WorldSpec
    train: SampleSet
    holdout: SampleSet
    test: SampleSet
    unseen: np.ndarray  # holdout positions match may use
    audit: np.ndarray  # holdout positions of the null and the population attack
    subjects: np.ndarray  # [200, 5] training positions


def make_world(dataset: ImageDataset, spec: WorldSpec, n_subjects: int, per_subject: int
               ) -> World:
    rng = np.random.default_rng(spec.seed)
    official = dataset.official_test.numpy()
    pool = rng.permutation(np.flatnonzero(~official))
    tests = rng.permutation(np.flatnonzero(official))[: spec.n_test]

    def take(index: np.ndarray) -> SampleSet:
        chosen = torch.from_numpy(np.sort(index))
        return SampleSet(dataset.images[chosen].contiguous(), dataset.labels[chosen])

    train_set = take(pool[: spec.n_train])
    holdout = take(pool[spec.n_train: spec.n_train + spec.n_holdout])
    order = rng.permutation(spec.n_holdout)
    half = spec.n_holdout // 2
    owned = rng.permutation(spec.n_train)[: n_subjects * per_subject]
    return World(spec, train_set, holdout, take(tests), unseen=np.sort(order[:half]),
                 audit=np.sort(order[half:]), subjects=owned.reshape(n_subjects, per_subject))


def factory() -> torch.nn.Module:
    return build_model(ARCH)


def trained(path: Path, samples: SampleSet, seed: int) -> tuple[torch.nn.Module, float]:
    """A model trained with the recipe (cached with its training seconds)."""
    model = factory()
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        load_weights(model, path)  # safetensors: cached weights are never unpickled
        return model.eval(), float(json.loads(meta.read_text())["seconds"])
    started = time.perf_counter()
    train(model, samples, RECIPE, device=CPU, seed=seed)
    seconds = time.perf_counter() - started
    save_weights(model, path)
    meta.write_text(json.dumps({"seconds": seconds, "n": len(samples)}))
    return model.eval(), seconds


def references(world: World, cache: Path) -> tuple[ReferenceStatistics, list[float]]:
    """The 16 reference models' OUT statistics and training seconds, each model cached."""
    def path(index: int) -> Path:
        return cache / f"reference-{index:02d}.npz"

    done = {i for i in range(REFERENCES) if path(i).exists()}

    def keep(output: ReferenceOutput) -> None:
        np.savez(path(output.index), index=output.index, out_positions=output.out_positions,
                 out_phi=output.out_phi, holdout_positions=output.holdout_positions,
                 holdout_phi=output.holdout_phi, seconds=output.seconds)
        log(f"{world.spec.name}: reference {output.index + 1}/{REFERENCES} "
            f"{output.seconds:.0f} s")

    train_references(factory, RECIPE, train_set=world.train, holdout=world.holdout,
                     k=REFERENCES, seed=world.spec.seed + 1, device=CPU, skip=done,
                     on_reference=keep)
    outputs = []
    for index in range(REFERENCES):
        saved = np.load(path(index))
        outputs.append(ReferenceOutput(int(saved["index"]), saved["out_positions"],
                                       saved["out_phi"], saved["holdout_positions"],
                                       saved["holdout_phi"], float(saved["seconds"])))
    statistics = ReferenceStatistics.from_outputs(
        outputs, k=REFERENCES, n_train=len(world.train), n_holdout=len(world.holdout))
    return statistics, [o.seconds for o in outputs]


def paired_timing(world: World, epochs: int = 3, repeats: int = 2) -> dict[str, float]:
    """Seconds of ``epochs`` epochs of the recipe on all training samples and on a random half
    (a reference's share), alternated ``repeats`` times so that both meet the same load: the
    ratio prices one reference model in trainings of the original. Order full-half,
    half-full, ... after a warm-up epoch."""
    half = torch.from_numpy(np.random.default_rng(0).permutation(len(world.train))[
        : len(world.train) // 2])
    seconds: dict[str, list[float]] = {"full": [], "half": []}
    pair = [("full", world.train), ("half", world.train.subset(half))]
    train(factory(), pair[1][1], RECIPE.with_(epochs=1), device=CPU, seed=0)  # warm-up
    for repeat in range(repeats):
        for name, samples in (pair if repeat % 2 == 0 else pair[::-1]):
            started = time.perf_counter()
            train(factory(), samples, RECIPE.with_(epochs=epochs), device=CPU, seed=0)
            seconds[name].append(time.perf_counter() - started)
    full, part = sum(seconds["full"]), sum(seconds["half"])
    return {"epochs": epochs, "repeats": repeats, "full_seconds": full, "half_seconds": part,
            "reference_over_original": part / full}


@dataclass
class Outputs:
    """One model's logits on the samples the tests read: all training samples (or only
    ``positions``) and the audit slice."""

    train_logits: torch.Tensor  # [n_train or len(positions), 10]
    train_y: torch.Tensor
    audit_logits: torch.Tensor
    audit_y: torch.Tensor
    positions: np.ndarray | None = None  # None: row i is training position i

    def rows(self, positions: np.ndarray) -> np.ndarray:
        if self.positions is None:
            return positions
        where = {p: i for i, p in enumerate(self.positions.tolist())}
        return np.array([where[p] for p in positions.tolist()])

    def phi(self, positions: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(self.rows(positions))
        return logit_confidence(self.train_logits[rows].double(), self.train_y[rows]).numpy()

    def audit_phi(self) -> np.ndarray:
        return logit_confidence(self.audit_logits.double(), self.audit_y).numpy()


def outputs_of(model: torch.nn.Module, world: World, positions: np.ndarray | None = None
               ) -> Outputs:
    samples = world.train if positions is None else world.train.subset(
        torch.from_numpy(positions))
    audit = world.holdout.subset(torch.from_numpy(world.audit))
    return Outputs(predict_logits(model, samples, CPU), samples.y.cpu(),
                   predict_logits(model, audit, CPU), audit.y.cpu(), positions)


# ---------------------------------------------------------------- the tests

def per_sample_test(world: World, refs: ReferenceStatistics, candidate: Outputs, base: Outputs,
                    groups: list[np.ndarray], names: list[str], *, config: Config,
                    alpha: float) -> per_sample.PerSampleEvidence:
    """The engine's per-request test on ``groups`` (training positions per request), read
    from the gate half of a k-model set (models 0 .. k/2 - 1)."""
    positions = np.concatenate(groups)
    request_of = [name for name, group in zip(names, groups, strict=True) for _ in group]
    forget_out, holdout_out = config.out(refs, positions, world.audit)
    with min_out(config.min_out):
        return per_sample.per_request_test(
            candidate_phi=candidate.phi(positions), base_phi=base.phi(positions),
            forget_out=forget_out, holdout_candidate_phi=candidate.audit_phi(),
            holdout_base_phi=base.audit_phi(), holdout_out=holdout_out, request_of=request_of,
            alpha=alpha, spread=config.spread, seed=0)


def population_gate(candidate: Outputs, positions: np.ndarray, alpha: float) -> dict[str, Any]:
    """Today's gate on one forget set: the population attack (10 samples and more) and the
    KS test as ``build_verification_report`` runs them, then ``decide`` at the default
    thresholds and with the KS test at ``alpha``; ``refused``: failed on membership."""
    rows = torch.from_numpy(candidate.rows(positions))
    logits, y = candidate.train_logits[rows], candidate.train_y[rows]
    report = VerificationReport(scenario=Scenario("subset").to_dict(), n_forget=len(positions))
    if len(positions) >= 10 and len(candidate.audit_y) >= 10:
        report.mia = {"candidate": population_mia(
            attack_features(logits, y, "loss"),
            attack_features(candidate.audit_logits, candidate.audit_y, "loss"),
            seed=0).to_dict()}
    report.ks = ks_forget_test(per_sample_loss(logits, y),
                               per_sample_loss(candidate.audit_logits,
                                               candidate.audit_y)).to_dict()
    result: dict[str, Any] = {
        "mia_accuracy": report.mia["candidate"]["accuracy"] if report.mia else None,
        "ks_p": report.ks["p_value"]}
    for name, limits in (("default", Thresholds()), ("alpha", Thresholds(min_ks_p_value=alpha))):
        decide(report, limits)
        result[name] = any(m in r for r in report.reasons for m in MEMBERSHIP)
        result[f"{name}_reasons"] = list(report.reasons)
    return result


def check_population_gate(world: World, model: torch.nn.Module, out: Outputs,
                          positions: np.ndarray, alpha: float) -> bool:
    """True when the cached-logit gate says what ``build_verification_report`` + ``decide``
    say on the same forget set (membership reasons)."""
    forget = world.train.subset(torch.from_numpy(positions))
    audit = world.holdout.subset(torch.from_numpy(world.audit))
    report = build_verification_report(model, model, forget=forget, audit=audit,
                                       test=world.test, scenario=Scenario("subset"),
                                       device=CPU, seed=0)
    decide(report, Thresholds())
    engine = [r for r in report.reasons if any(m in r for m in MEMBERSHIP)]
    ours = population_gate(out, positions, alpha)["default_reasons"]
    return engine == ours


def binomial_band(n: int, alpha: float) -> tuple[int, int]:
    """The central 95 % range of the number of flags among n null trials at rate alpha."""
    low, high = stats.binom.interval(0.95, n, alpha)
    return int(low), int(high)


def clopper_pearson(x: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    low = stats.beta.ppf(0.025, x, n - x + 1) if x else 0.0
    high = stats.beta.ppf(0.975, x + 1, n - x) if x < n else 1.0
    return float(low), float(high)


def figures(values: list[float | None]) -> list[float]:
    """Figures of testable requests: a figure is None only where nothing was testable."""
    known = [v for v in values if v is not None]
    assert len(known) == len(values), values
    return known


def rate(flags: list[bool]) -> dict[str, Any]:
    x, n = int(sum(flags)), len(flags)
    return {"flagged": x, "n": n, "rate": x / n if n else None, "ci95": clopper_pearson(x, n)}


def roc_figures(members: np.ndarray, nonmembers: np.ndarray) -> dict[str, float]:
    members, nonmembers = members[~np.isnan(members)], nonmembers[~np.isnan(nonmembers)]
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    values = np.concatenate([members, nonmembers])
    fpr, tpr, _ = roc_curve(labels, values)
    return {"auc": float(roc_auc_score(labels, values)),
            "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
            "tpr_at_5pct_fpr": float(tpr[fpr <= 0.05].max()),
            "n_members": int(len(members)), "n_nonmembers": int(len(nonmembers))}


# ---------------------------------------------------------------- one world

def run_world(dataset: ImageDataset, spec: WorldSpec, args: argparse.Namespace
              ) -> dict[str, Any]:
    started = time.perf_counter()
    alpha = args.alpha
    world = make_world(dataset, spec, args.subjects, args.per_subject)
    cache = CACHE / f"{spec.name}-{spec.digest()}"
    cache.mkdir(parents=True, exist_ok=True)
    log(f"{spec.name}: {len(world.train)} train, {len(world.holdout)} holdout "
        f"({len(world.audit)} audit), cache {cache}")
    original, original_seconds = trained(cache / "original.safetensors", world.train, spec.seed)
    log(f"{spec.name}: original trained in {original_seconds:.0f} s")
    owned = world.subjects.reshape(-1)
    keep = np.setdiff1d(np.arange(len(world.train)), owned)
    retrain, retrain_seconds = trained(cache / "retrain.safetensors",
                                       world.train.subset(torch.from_numpy(keep)), spec.seed)
    log(f"{spec.name}: retrain trained in {retrain_seconds:.0f} s")
    refs, ref_seconds = references(world, cache)
    log(f"{spec.name}: references done ({sum(ref_seconds):.0f} s)")

    out = {"original": outputs_of(original, world), "retrain": outputs_of(retrain, world)}
    accuracy = {name: evaluate(model, world.test, CPU)["accuracy"]
                for name, model in (("original", original), ("retrain", retrain))}
    names = [f"s{i:03d}" for i in range(len(world.subjects))]
    groups = list(world.subjects)

    # (a) one subject at a time: p < alpha, no BH
    subject_rows: list[dict[str, Any]] = []
    detect: dict[str, Any] = {}
    for config in CONFIGS:
        row: dict[str, Any] = {"key": config.key, "label": config.label, "k": config.k,
                               "spread": config.spread, "gate_models": config.k // 2,
                               "mean_out_per_sample": float(np.mean(np.sum(
                                   ~np.isnan(refs.train_phi[config.rows]), axis=0)))}
        for model_name in ("original", "retrain"):
            evidence = per_sample_test(world, refs, out[model_name], out["original"], groups,
                                       names, config=config, alpha=alpha)
            tested = [r for r in evidence.requests if r.testable]
            row[model_name] = rate([r.p_value is not None and r.p_value < alpha
                                    for r in evidence.requests])
            row[model_name]["testable"] = len(tested)
            p_values = [r.p_value for r in evidence.requests]
            row[model_name]["p_values"] = [None if p is None else round(p, 6)
                                           for p in p_values]
            row[model_name]["p_below"] = {str(t): sum(p is not None and p < t
                                                      for p in p_values)
                                          for t in (alpha / 10, alpha / 50)}
            row[model_name]["median_mean_score"] = float(np.median(
                [r.mean_score for r in tested]))
            with min_out(config.min_out):
                null, _ = per_sample.score(
                    out[model_name].audit_phi(),
                    config.out(refs, None, world.audit)[1], spread=config.spread,
                    pooled=evidence.pooled_spread)
            row[model_name]["null_mean_score"] = float(np.nanmean(null))
            if model_name == "original":
                full = figures([r.detectable_shift for r in tested
                                if r.n_testable == args.per_subject])
                detect[config.key] = {
                    "median_detectable_shift_score": float(np.median(full)) if full else None,
                    "median_detectable_shift_phi": (float(np.median(full)) *
                                                    evidence.pooled_spread
                                                    if full and config.spread == "pooled"
                                                    else None),
                    "pooled_spread_phi": evidence.pooled_spread,
                    "out_references_per_sample": evidence.references,
                    "n_null": evidence.n_null}
        subject_rows.append(row)
        log(f"{spec.name}: subjects {config.key}: power {row['original']['rate']:.3f}, "
            f"false refusals {row['retrain']['rate']:.3f}")
    today = {}
    for model_name in ("original", "retrain"):
        gates = [population_gate(out[model_name], g, alpha) for g in groups]
        today[model_name] = {"default": rate([g["default"] for g in gates]),
                             "alpha": rate([g["alpha"] for g in gates])}
    subject_check = check_population_gate(world, original, out["original"], groups[0], alpha)

    # (b) batches: random partitions of the subjects
    rng = np.random.default_rng([spec.seed, 7])
    partitions = [rng.permutation(len(groups)) for _ in range(args.partitions)]
    batch_rows: dict[str, dict[str, Any]] = {}
    batch_check = None
    for size in args.batch_sizes:
        batches = [order[i: i + size] for order in partitions
                   for i in range(0, len(order) - size + 1, size)]
        row = {"size": size, "batches": len(batches)}
        for model_name in ("original", "retrain"):
            gates = [population_gate(out[model_name],
                                     np.concatenate([groups[i] for i in b]), alpha)
                     for b in batches]
            row[f"{model_name}_population"] = {
                "default": rate([g["default"] for g in gates]),
                "alpha": rate([g["alpha"] for g in gates]),
                # which check refused, at the default thresholds
                "by": {m: sum(any(m in r for r in g["default_reasons"]) for g in gates)
                       for m in MEMBERSHIP},
                "mia_accuracy_median": (float(np.median([g["mia_accuracy"] for g in gates]))
                                        if gates and gates[0]["mia_accuracy"] is not None
                                        else None)}
            for config in CONFIGS:
                refused, shares = [], []
                for b in batches:
                    evidence = per_sample_test(
                        world, refs, out[model_name], out["original"], [groups[i] for i in b],
                        [names[i] for i in b], config=config, alpha=alpha)
                    refused.append(evidence.n_flagged > 0)
                    shares.append(evidence.n_flagged / len(b))
                row[f"{model_name}_{config.key}"] = {**rate(refused),
                                                      "mean_share_flagged": float(
                                                          np.mean(shares))}
        if batch_check is None:
            first = np.concatenate([groups[i] for i in batches[0]])
            batch_check = check_population_gate(world, original, out["original"], first,
                                                alpha)
        batch_rows[str(size)] = row
        log(f"{spec.name}: batches of {size} done")

    # match's candidate on a few batches of the first partition
    match_runs = []
    for size, count in args.match_batches:
        for j in range(count):
            b = partitions[0][j * size: (j + 1) * size]
            bgroups = [groups[i] for i in b]
            positions = np.concatenate(bgroups)
            retain_positions = np.setdiff1d(np.arange(len(world.train)), positions)
            path = cache / f"match-{size}-{j}.safetensors"
            candidate = factory()
            meta = path.with_suffix(".json")
            if path.exists() and meta.exists():
                load_weights(candidate, path)
                run_meta = json.loads(meta.read_text())
            else:
                result = get_method("match").unlearn(
                    original, retain=world.train.subset(torch.from_numpy(retain_positions)),
                    forget=world.train.subset(torch.from_numpy(positions)),
                    unseen=world.holdout.subset(torch.from_numpy(world.unseen)),
                    original_recipe=RECIPE, scenario=Scenario("subset"),
                    config=get_method("match").Config(), device=CPU, seed=1000 * size + j)
                candidate = result.model
                run_meta = {"steps": result.steps, "seconds": result.seconds}
                save_weights(candidate, path)
                meta.write_text(json.dumps(run_meta))
            candidate.eval()
            cout = outputs_of(candidate, world, positions)
            base = outputs_of(original, world, positions)
            run: dict[str, Any] = {"size": size, "index": j, **run_meta,
                                   "test_accuracy": evaluate(candidate, world.test,
                                                             CPU)["accuracy"]}
            gate = population_gate(cout, positions, alpha)
            run["population"] = {key: gate[key] for key in ("default", "alpha",
                                                             "mia_accuracy", "ks_p")}
            run["subject_ks"] = [population_gate(cout, g, alpha) for g in bgroups]
            run["subject_ks"] = {key: [g[key] for g in run["subject_ks"]]
                                 for key in ("default", "alpha")}
            for config in CONFIGS:
                evidence = per_sample_test(world, refs, cout, base, bgroups,
                                           [names[i] for i in b], config=config, alpha=alpha)
                run[config.key] = {
                    "p_below_alpha": [r.p_value is not None and r.p_value < alpha
                                      for r in evidence.requests],
                    "flagged": evidence.n_flagged}
            match_runs.append(run)
            log(f"{spec.name}: match on {size} subjects ({run['steps']} steps, "
                f"{run['seconds']:.0f} s): k=16 flagged {run['k16-pooled']['flagged']}, "
                f"population refused {gate['default']}")
    for row in subject_rows:
        flags = [f for run in match_runs for f in run[row["key"]]["p_below_alpha"]]
        row["match"] = rate(flags)
    today["match"] = {key: rate([f for run in match_runs for f in run["subject_ks"][key]])
                      for key in ("default", "alpha")}
    for size in {s for s, _ in args.match_batches}:
        runs = [r for r in match_runs if r["size"] == size]
        if str(size) not in batch_rows:
            continue
        row = batch_rows[str(size)]
        row["match_population"] = {key: rate([r["population"][key] for r in runs])
                                   for key in ("default", "alpha")}
        for config in CONFIGS:
            row[f"match_{config.key}"] = {
                **rate([r[config.key]["flagged"] > 0 for r in runs]),
                "mean_share_flagged": float(np.mean(
                    [r[config.key]["flagged"] / size for r in runs]))}

    # (c) AUC of the per-sample score vs the raw statistic, on the original
    audit_phi = out["original"].audit_phi()
    all_train = np.arange(len(world.train))
    train_phi = out["original"].phi(all_train)
    roc = {"raw phi": roc_figures(train_phi, audit_phi)}
    for config in CONFIGS:
        train_out, hold_out = config.out(refs, None, world.audit)
        with min_out(config.min_out):
            sigma = per_sample.pooled_spread(np.concatenate([train_out, hold_out], axis=1))
            members, _ = per_sample.score(train_phi, train_out, spread=config.spread,
                                          pooled=sigma)
            nonmembers, _ = per_sample.score(audit_phi, hold_out, spread=config.spread,
                                             pooled=sigma)
        roc[config.key] = roc_figures(members, nonmembers)

    # (e) cost
    timing = paired_timing(world)
    log(f"{spec.name}: paired timing {timing}")
    cost = {f"k{k}": {"reference_seconds": float(sum(ref_seconds[:k])),
                      "multiple_of_original": float(sum(ref_seconds[:k]) / original_seconds),
                      "multiple_in_images_seen": k / 2,
                      "multiple_paired_timing": k * timing["reference_over_original"]}
            for k in KS}
    models = [{"index": i, "out_phi_mean": float(np.nanmean(refs.train_phi[i])),
               "holdout_phi_mean": (float(np.nanmean(refs.holdout_phi[i]))
                                    if not np.isnan(refs.holdout_phi[i]).all() else None)}
              for i in range(REFERENCES)]
    return {
        "spec": spec.__dict__, "reference_models": models, "n_audit": len(world.audit),
        "n_unseen": len(world.unseen), "original_seconds": original_seconds,
        "retrain_seconds": retrain_seconds, "reference_seconds": ref_seconds,
        "test_accuracy": accuracy,
        "binomial_band": {"n": len(groups), "alpha": alpha,
                          "counts": binomial_band(len(groups), alpha)},
        "subjects": subject_rows, "subject_today": today, "batches": batch_rows,
        "match_runs": match_runs, "roc": roc, "detectable": detect,
        "p_value_resolution": 1 / (per_sample.NULL_DRAWS + 1), "cost": cost,
        "paired_timing": timing,
        "checks": {"population_gate_equals_engine_subject": subject_check,
                   "population_gate_equals_engine_batch": batch_check,
                   "cached_group_null_equals_engine": args.null_check},
        "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the tables

def pct(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f} %"


def flagged(cell: dict[str, Any]) -> str:
    if cell["n"] == 0:
        return "—"
    return f"{pct(cell['rate'])} ({cell['flagged']}/{cell['n']})"


def with_ci(cell: dict[str, Any]) -> str:
    low, high = cell["ci95"]
    return f"{flagged(cell)} [{100 * low:.1f}–{100 * high:.1f}]"


def world_markdown(name: str, w: dict[str, Any], alpha: float) -> list[str]:
    spec = w["spec"]
    low, high = w["binomial_band"]["counts"]
    n = w["binomial_band"]["n"]
    lines = [
        f"## World `{name}`: {spec['n_train']} training, {spec['n_holdout']} holdout "
        f"({w['n_audit']} audit), {spec['n_test']} test images", "",
        f"Original test accuracy {w['test_accuracy']['original']:.3f}, retrain (without the "
        f"1 000 subject samples) {w['test_accuracy']['retrain']:.3f}. One training of the "
        f"original: {w['original_seconds']:.0f} s.", "",
        f"### (a) Single subjects (5 samples), share with p < {alpha} (no BH)", "",
        f"Under the null (retrain) the count of false refusals among {n} subjects lies in "
        f"{low}–{high} ({100 * low / n:.1f}–{100 * high / n:.1f} %) with 95 % probability "
        "(binomial, central). Brackets: Clopper–Pearson 95 % interval of the observed rate.", "",
        "| test | gate models (OUT per sample) | testable subjects | original: power | "
        "retrain: false refusals | within band | match candidate |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in w["subjects"]:
        within = low <= row["retrain"]["flagged"] <= high
        lines.append(
            f"| {row['label']} | {row['gate_models']} "
            f"({row['mean_out_per_sample']:.1f}) | {row['original']['testable']} | "
            f"{with_ci(row['original'])} | {with_ci(row['retrain'])} | "
            f"{'yes' if within else 'no'} | {flagged(row['match'])} |")
    today = w["subject_today"]
    for key, label in (("default", "today's gate: KS p < 0.01 (default)"),
                       ("alpha", f"KS gate at p < {alpha}")):
        within = low <= today["retrain"][key]["flagged"] <= high
        lines.append(f"| {label} | — | {n} | {with_ci(today['original'][key])} | "
                     f"{with_ci(today['retrain'][key])} | {'yes' if within else 'no'} | "
                     f"{flagged(today['match'][key])} |")
    lines += ["", "### (b) Batches: share refused", "",
              "Per-sample gate: refused when any request is flagged after Benjamini–Hochberg "
              f"at {alpha}; population+KS gate: `decide()` fails on a membership reason "
              "(population attack from 50 samples, KS below 200 samples). Batches are "
              "disjoint within a random partition of the 200 subjects; partitions overlap, so "
              "batches of different partitions are not independent. Share flagged: mean "
              "share of a batch's requests flagged.", "",
              "| batch | batches | model | per-sample k=16 pooled: refused (share flagged) | "
              "k=8 pooled | k=16 per-sample | k=16 pooled, models 8–15 | k=16 pooled, "
              f"centred | population+KS (default) | population + KS at {alpha} |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, row in w["batches"].items():
        for model in ("original", "retrain", "match"):
            if f"{model}_population" not in row:
                continue
            cells = [f"{flagged(row[f'{model}_{c}'])} "
                     f"({pct(row[f'{model}_{c}']['mean_share_flagged'])})"
                     for c in BATCH_COLUMNS if f"{model}_{c}" in row]
            pop = row[f"{model}_population"]
            by = pop.get("by")
            why = (f" (attack {by['membership attack']}, KS {by['KS test']})"
                   if by and pop["default"]["flagged"] else "")
            label = {"original": "original (power)", "retrain": "retrain (false refusals)",
                     "match": "match candidate"}[model]
            count = row["batches"] if model != "match" else pop["default"]["n"]
            lines.append(f"| {size} subjects | {count} | {label} | " + " | ".join(cells) +
                         f" | {flagged(pop['default'])}{why} | {flagged(pop['alpha'])} |")
    main = next((r for r in w["subjects"] if r["key"] == "k16-pooled"), None)
    if main is not None and "p_below" in main["retrain"]:
        below = main["retrain"]["p_below"]
        tight = sorted(below, key=float, reverse=True)
        lines += ["", "Under the retrain (k=16 pooled), subjects with p below "
                  f"{float(tight[0]):g} / {float(tight[1]):g} (Benjamini–Hochberg's smallest "
                  "threshold in a batch of 10 / 50): "
                  f"{below[tight[0]]} / {below[tight[1]]} of {main['retrain']['n']}. Such a "
                  "subject refuses the batch that holds it in every partition, so the batch "
                  "false-refusal shares above count few distinct subjects."]
    lines += ["", "### (c) Membership signal on the original (members: all training samples, "
              "non-members: the audit slice)", "",
              "| statistic | members scored | AUC | TPR at 1 % FPR | TPR at 5 % FPR |",
              "| --- | --- | --- | --- | --- |"]
    for key, roc in w["roc"].items():
        lines.append(f"| {key} | {roc['n_members']} | {roc['auc']:.3f} | "
                     f"{pct(roc['tpr_at_1pct_fpr'])} | {pct(roc['tpr_at_5pct_fpr'])} |")
    lines += ["", "### (d) Resolution", "",
              f"p-value resolution: {w['p_value_resolution']:.1e} (20 000 null draws). "
              f"Median detectable mean shift for 5 testable samples at alpha {alpha} with "
              "80 % power, and the median mean score of a subject under the original "
              "and the retrain, beside the null's mean (the audit slice scored the same way "
              "under the same model: a subject's signal is its score minus that):", "",
              "| test | detectable shift (score units) | in phi units | pooled spread (phi) | "
              "original: median subject score (null mean) | retrain: same |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in w["subjects"]:
        key = row["key"]
        det = w["detectable"][key]
        shift = det["median_detectable_shift_score"]
        phi = det["median_detectable_shift_phi"]
        lines.append(f"| {key} | {'—' if shift is None else f'{shift:.2f}'} | "
                     f"{'—' if phi is None else f'{phi:.2f}'} | "
                     f"{det['pooled_spread_phi']:.2f} | "
                     f"{row['original']['median_mean_score']:.2f} "
                     f"({row['original'].get('null_mean_score', math.nan):.2f}) | "
                     f"{row['retrain']['median_mean_score']:.2f} "
                     f"({row['retrain'].get('null_mean_score', math.nan):.2f}) |")
    timing = w.get("paired_timing")
    paired = ("not measured" if timing is None else
              f"{timing['epochs']} epochs × {timing['repeats']}: {timing['half_seconds']:.1f} s "
              f"against {timing['full_seconds']:.1f} s, a reference = "
              f"{timing['reference_over_original']:.2f} of the original")
    lines += ["", "### (e) Cost of the reference job", "",
              "Each reference trains the recipe on half the training samples, so k models see "
              "k/2 times the images of one training of the original (the nominal multiple); "
              "the measured multiple divides wall seconds, each model timed in the run that "
              "trained it, on a machine shared with other work.", "",
              "The median column prices k models at the median model's seconds, which a "
              "neighbour slowing a few of them moves less; the paired column at k times the "
              "ratio of a few epochs on half the training samples to the same epochs on all "
              "of them, timed alternately in one stretch (" + paired + ").", "",
              "| k | models trained | seconds | measured multiple of one training of the "
              "original | k × median model / original | paired timing | nominal multiple |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    median = float(np.median(w["reference_seconds"]))
    for key, cost in w["cost"].items():
        k = int(key[1:])
        lines.append(f"| {k} | {k} | {cost['reference_seconds']:.0f} | "
                     f"{cost['multiple_of_original']:.2f} | "
                     f"{k * median / w['original_seconds']:.2f} | "
                     f"{cost.get('multiple_paired_timing', math.nan):.2f} | {k / 2:.1f} |")
    runs = w["match_runs"]
    if runs:
        lines += ["", f"match runs: {len(runs)} (" + ", ".join(
            f"{r['size']} subjects: {r['steps']} steps, {r['seconds']:.0f} s, test acc "
            f"{r['test_accuracy']:.3f}" for r in runs) + ")."]
    checks = w["checks"]
    lines += ["", f"Checks: cached-logit population+KS gate equals `build_verification_report` "
              f"+ `decide` on a subject: {checks['population_gate_equals_engine_subject']}, on "
              f"a batch: {checks['population_gate_equals_engine_batch']}; cached group null "
              f"equals `group_null`: {checks['cached_group_null_equals_engine']}. World took "
              f"{w['seconds']:.0f} s.", ""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Gate power: the per-sample test against the population+KS gate", "",
        # results written before the one machine description name torch's threads `threads`
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"{m.get('torch_threads', m.get('threads'))} thread "
        f"(shared with other work; load average at the start {m['load_average'][0]:.1f}).",
        f"Settings: Fashion-MNIST, cnn-small, recipe {s['recipe']}; {s['subjects']} random "
        f"subjects of {s['per_subject']} training samples; alpha {s['alpha']}; batches of "
        f"{', '.join(map(str, s['batch_sizes']))} subjects over {s['partitions']} random "
        f"partitions; match on {s['match_batches']} (batches of size: count) per world.",
        "16 reference models (8 complementary pairs) per world; a set of k references is "
        "read through its gate half, models 0 .. k/2-1 of the same plan (k=16: 4 OUT values "
        "per sample; k=8: 2; k=4: 1; k=2: model 0 only, so about half the samples are not "
        "testable). k=2 and 4 run with `per_sample.MIN_OUT` lowered to 1 (the service "
        "refuses them); with one OUT value the pooled spread is 1.0 (p-values do not depend "
        "on it).", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    pending = [w for w in s["worlds"] if w not in result["worlds"]]
    if pending:
        lines += [f"**Partial results**: world(s) {', '.join(pending)} not measured.", ""]
    lines += summary_lines(result)
    for name, w in result["worlds"].items():
        lines += world_markdown(name, w, s["alpha"])
    return "\n".join(lines) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    alpha = result["settings"]["alpha"]
    lines = ["## Targets", "",
             "| world | subject false refusals k=16 (band) | subject power k=16 | same, "
             f"models 8–15 | KS gate power at {alpha} (at 0.01, today) | power ratio | "
             "batch of 10: per-sample / population+KS refusals, original (retrain) | "
             "batch of 50 | reference job k=16: measured (paired, nominal) × original |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, w in result["worlds"].items():
        row = next(r for r in w["subjects"] if r["key"] == "k16-pooled")
        rep = next(r for r in w["subjects"] if r["key"] == "k16-pooled-models8-15")
        ks = w["subject_today"]["original"]["alpha"]
        today = w["subject_today"]["original"]["default"]
        low, high = w["binomial_band"]["counts"]
        ratio = (row["original"]["rate"] / ks["rate"]) if ks["rate"] else math.inf
        batch = []
        for size in ("10", "50"):
            b = w["batches"].get(size)
            if b is None:
                batch.append("—")
                continue
            ps, pop = b["original_k16-pooled"], b["original_population"]["default"]
            ps_r, pop_r = b["retrain_k16-pooled"], b["retrain_population"]["default"]
            batch.append(f"{pct(ps['rate'])} / {pct(pop['rate'])} ({pct(ps_r['rate'])} / "
                         f"{pct(pop_r['rate'])})")
        cost = w["cost"]["k16"]
        lines.append(f"| {name} | {row['retrain']['flagged']}/{row['retrain']['n']} "
                     f"({low}–{high}) | {pct(row['original']['rate'])} | "
                     f"{pct(rep['original']['rate'])} (false refusals "
                     f"{rep['retrain']['flagged']}/{rep['retrain']['n']}) | {pct(ks['rate'])} "
                     f"({pct(today['rate'])}) | {ratio:.1f}× | {batch[0]} | {batch[1]} | "
                     f"{cost['multiple_of_original']:.1f} "
                     f"({cost.get('multiple_paired_timing', math.nan):.1f}, "
                     f"{cost.get('multiple_in_images_seen', 8):.0f}) |")
    lines += ["", f"Targets: false refusals within alpha's ({alpha}) binomial band; power at "
              "least 3 times the population+KS gate's at the same alpha; cost reported.", ""]
    return lines


def null_check() -> bool:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=700)
    scores[::50] = np.nan
    ok = True
    for n in (1, 3, 5, 50):
        a, b = _original_group_null(scores, n, seed=0), cached_group_null(scores, n, seed=0)
        ok = ok and a.means is not None and b.means is not None and \
            np.array_equal(a.means, b.means) and a.sd == b.sd and a.mu == b.mu
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="demo,6000")
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--per-subject", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--batch-sizes", default="10,50")
    parser.add_argument("--partitions", type=int, default=5)
    parser.add_argument("--match-batches", default="10:4,50:2",
                        help="size:count of batches match runs on, per world")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs,
                        help="Fewer epochs than the demo's 30: a quick trial only.")
    parser.add_argument("--data-dir", default=str(REPO / ".lethe"))
    parser.add_argument("--out", default=str(RESULTS / "gate-power-fashion-mnist"))
    parser.add_argument("--note", default="", help="A remark printed with the results.")
    parser.add_argument("--render", action="store_true",
                        help="Only rewrite the markdown from the JSON results.")
    args = parser.parse_args()
    if args.render:
        write_results(args.out, json.loads(Path(args.out + ".json").read_text()), markdown)
        return
    torch.set_num_threads(args.threads)
    if args.epochs != RECIPE.epochs:  # a quick trial of the whole run; cached apart
        globals()["RECIPE"] = RECIPE.with_(epochs=args.epochs)
    args.batch_sizes = [int(s) for s in args.batch_sizes.split(",")]
    args.match_batches = [tuple(int(x) for x in part.split(":"))
                          for part in args.match_batches.split(",") if part]
    args.null_check = null_check()
    per_sample.group_null = cached_group_null
    worlds = args.worlds.split(",")
    dataset = load_fashion_mnist(Path(args.data_dir))
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {"worlds": worlds, "recipe": RECIPE.to_dict(), "architecture": ARCH,
                     "subjects": args.subjects, "per_subject": args.per_subject,
                     "alpha": args.alpha, "batch_sizes": args.batch_sizes,
                     "partitions": args.partitions,
                     "match_batches": ", ".join(f"{s}: {c}" for s, c in args.match_batches),
                     "references": REFERENCES, "null_draws": per_sample.NULL_DRAWS,
                     "note": args.note},
        "worlds": {}}
    for name in worlds:
        result["worlds"][name] = run_world(dataset, WORLDS[name], args)
        write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
