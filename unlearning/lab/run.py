"""``lethe lab run``: train an original and its retrain (cached by recipe), run unlearning
methods on it in one scenario over several seeds, measure everything against the retrain, and
write JSON plus a table.

Data layout per seed: the training set is the dataset's training split (all 60 000 images for
Fashion-MNIST, so RTE is measured at full size); the unseen data is split into a holdout and a
test set, and the holdout again into the *unseen* slice handed to the methods and the *audit*
slice only the verification reads, so no method can tune itself on the data it is judged on
(docs/methods.md, "Data slices").
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearning.architectures import build_model
from unlearning.data.datasets import ImageDataset, load_dataset
from unlearning.loops import ProgressCallback, SampleSet
from unlearning.machine import describe as describe_machine
from unlearning.methods import get_method
from unlearning.runtime import resolve_device, seed_everything
from unlearning.scenarios import Scenario, Trigger, poison, select_forget_samples
from unlearning.training import Recipe, train
from unlearning.verification.metrics import retdev, rte, scenario_metrics
from unlearning.weights import load_weights, save_weights

DEFAULT_RECIPES = {
    "fashion-mnist": Recipe(epochs=30, lr=0.05, batch_size=128, weight_decay=0.0),
    "digits": Recipe(epochs=60, lr=0.05, batch_size=64, weight_decay=0.0),
}
# Named as the verification report's summary names them (older result files are read through
# verification.metrics.current_names).
METRIC_KEYS = ("retain_accuracy", "forget_accuracy", "test_accuracy", "mia_accuracy",
               "mia_auc", "attack_success_rate")


@dataclass(frozen=True)
class LabConfig:
    dataset: str
    arch: str
    scenario: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    data_dir: Path
    device: str = "auto"
    forget_fraction: float = 0.1
    forget_class: int = 0
    recipe: Recipe | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    target_label: int = 0
    poison_rate: float = 0.02
    trigger: Trigger = field(default_factory=Trigger)
    holdout_size: int = 5000  # the holdout, halved into unseen + audit (the rest is test)
    retain_eval_size: int = 10_000  # retain accuracy is estimated on a fixed sample
    train_size: int | None = None  # use only part of the training split (tests)
    # pad/replicate the images to (C, H, W) first, e.g. (3, 32, 32) for ImageNet-style models
    input_shape: tuple[int, int, int] | None = None
    # RTE's retrain time: None, as long as the cached retrain took to train (another day,
    # another load, another version of the code); N, N epochs of its recipe timed in this
    # process just before the methods run, scaled to the recipe's epochs (like with like)
    retime_epochs: int | None = None

    @property
    def effective_recipe(self) -> Recipe:
        return self.recipe or DEFAULT_RECIPES.get(self.dataset, Recipe())

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["data_dir"] = str(self.data_dir)
        values["recipe"] = self.effective_recipe.to_dict()
        return values


@dataclass
class SeedData:
    """One seed's splits, scenario and the sets every run is measured on."""

    train: SampleSet  # what the original trains on (poisoned in the backdoor scenario)
    forget: SampleSet
    retain: SampleSet
    retain_eval: SampleSet
    unseen: SampleSet  # the methods' half of the holdout
    audit: SampleSet  # the verifier's half
    test: SampleSet
    scenario: Scenario
    cache_key: dict[str, Any]


def _input_channels_and_size(dataset: ImageDataset) -> dict[str, int]:
    channels, height, _ = dataset.input_shape
    return {"in_channels": channels, "num_classes": len(dataset.classes), "input_size": height}


def prepare_seed(config: LabConfig, dataset: ImageDataset, seed: int) -> SeedData:
    generator = torch.Generator().manual_seed(seed)
    everything = SampleSet(dataset.images, dataset.labels)
    official_test = dataset.official_test
    if official_test.any():
        train_index = torch.nonzero(~official_test).flatten()
        unseen_index = torch.nonzero(official_test).flatten()
        unseen_index = unseen_index[torch.randperm(len(unseen_index), generator=generator)]
    else:  # no official split: 60 % train, the rest unseen
        order = torch.randperm(len(dataset), generator=generator)
        cut = int(0.6 * len(order))
        train_index, unseen_index = order[:cut].sort().values, order[cut:]
    if config.train_size is not None:
        train_index = train_index[torch.randperm(len(train_index), generator=generator)
                                  [:config.train_size]].sort().values
    holdout_size = min(config.holdout_size, len(unseen_index) // 2)
    holdout = everything.subset(unseen_index[:holdout_size])
    test = everything.subset(unseen_index[holdout_size:])
    half = len(holdout) // 2
    unseen, audit = holdout.subset(torch.arange(half)), holdout.subset(
        torch.arange(half, len(holdout)))
    train_set = everything.subset(train_index)
    if config.scenario == "backdoor":
        scenario = Scenario("backdoor", target_label=config.target_label, trigger=config.trigger)
        train_set, forget_index = poison(train_set, config.trigger, config.target_label,
                                         config.poison_rate, generator)
    elif config.scenario == "class":
        scenario = Scenario("class", forget_class=config.forget_class)
        forget_index = select_forget_samples(train_set.y, forget_class=config.forget_class,
                                             generator=generator)
    else:
        scenario = Scenario("subset")
        forget_index = select_forget_samples(train_set.y, fraction=config.forget_fraction,
                                             generator=generator)
    keep = torch.ones(len(train_set), dtype=torch.bool)
    keep[forget_index] = False
    retain = train_set.subset(torch.nonzero(keep).flatten())
    cache_key = {"dataset": config.dataset, "train_size": len(train_set), "seed": seed,
                 "poison": ({"rate": config.poison_rate, "target": config.target_label,
                             "trigger": config.trigger.to_dict()}
                            if config.scenario == "backdoor" else None)}
    return SeedData(train=train_set, forget=train_set.subset(forget_index), retain=retain,
                    retain_eval=retain.sample(config.retain_eval_size, generator),
                    unseen=unseen, audit=audit, test=test, scenario=scenario,
                    cache_key=cache_key)


def seed_metrics(model: nn.Module, data: SeedData, device: torch.device,
                 seed: int) -> dict[str, Any]:
    """One model's metrics on one seed's sets (what every lab row and benchmark reports)."""
    return scenario_metrics(model, forget=data.forget, retain=data.retain_eval, test=data.test,
                            audit=data.audit, scenario=data.scenario, device=device, seed=seed)


def model_spec(config: LabConfig, dataset: ImageDataset) -> dict[str, Any]:
    """The architecture spec the lab builds for ``dataset``: its input shape and classes, then
    the config's own keyword arguments."""
    return {"name": config.arch, "kwargs": {**_input_channels_and_size(dataset),
                                            **config.arch_kwargs}}


def model_cache_keys(config: LabConfig,
                     data: SeedData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The :class:`ModelCache` keys of one seed's original and of its retrain."""
    removed = {"scenario": data.scenario.to_dict(), "n_forget": len(data.forget),
               "fraction": config.forget_fraction if config.scenario == "subset" else None}
    return {**data.cache_key, "removed": None}, {**data.cache_key, "removed": removed}


class ModelCache:
    """Trained originals and retrains under ``<data dir>/lab-cache``, keyed by everything
    that determines their weights (data, architecture, recipe, seed, what was removed)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get_or_train(self, key: dict[str, Any], spec: dict[str, Any], data: SampleSet,
                     recipe: Recipe, seed: int, device: torch.device,
                     progress: ProgressCallback | None) -> tuple[nn.Module, dict[str, float]]:
        """The model and how long its training took (``seconds``, ``cpu_seconds``)."""
        digest = hashlib.sha256(json.dumps({**key, "arch": spec, "recipe": recipe.to_dict()},
                                           sort_keys=True).encode()).hexdigest()[:20]
        weights, meta = self.root / f"{digest}.safetensors", self.root / f"{digest}.json"
        seed_everything(seed)
        model = build_model(spec)
        if weights.exists() and meta.exists():
            load_weights(model, weights)
            timing = json.loads(meta.read_text())
        else:
            timing = train(model, data, recipe, device=device, seed=seed, progress=progress)
            save_weights(model, weights)
            meta.write_text(json.dumps({**key, "arch": spec, "recipe": recipe.to_dict(),
                                        **timing}, indent=1))
        return model.to(device).eval(), {k: float(timing[k]) for k in ("seconds", "cpu_seconds")}


def retime(spec: dict[str, Any], retain: SampleSet, recipe: Recipe, epochs: int, seed: int,
           device: torch.device) -> dict[str, float]:
    """The retrain's ``seconds`` and ``cpu_seconds``, from ``epochs`` of its recipe trained now
    (from scratch, thrown away) and scaled to the recipe's epochs: an epoch costs the same
    whatever the learning rate's schedule."""
    timing = train(build_model(spec), retain, recipe.with_(epochs=epochs), device=device,
                   seed=seed)
    scale = recipe.epochs / epochs
    return {"seconds": float(timing["seconds"]) * scale,
            "cpu_seconds": float(timing["cpu_seconds"]) * scale, "retimed_epochs": epochs}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the seeds that have it, beside the per-seed rows."""
    summary: dict[str, Any] = {k: _mean([r.get(k) for r in per_seed])
                               for k in (*METRIC_KEYS, "seconds", "cpu_seconds")}
    summary["per_seed"] = per_seed
    return summary


def run_lab(config: LabConfig, *, progress_factory: Callable[[str], ProgressCallback] | None
            = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (seed, method) of ``config``; return the JSON-ready result."""
    device = resolve_device(config.device)
    dataset = load_dataset(config.dataset, config.data_dir)
    if config.input_shape is not None:
        dataset = dataset.reshaped(*config.input_shape)
    recipe = config.effective_recipe
    spec = model_spec(config, dataset)
    cache = ModelCache(Path(config.data_dir).expanduser() / "lab-cache" / config.dataset)
    methods = [get_method(name) for name in config.methods]
    # On a CPU other work shares, wall time measures the neighbours; CPU time measures the
    # work. A GPU's work is not CPU time, so there wall time it is.
    clock = "cpu_seconds" if device.type == "cpu" else "seconds"
    originals, retrains, runs = [], [], []
    for seed in config.seeds:
        data = prepare_seed(config, dataset, seed)

        def measure(model: nn.Module, data: SeedData = data, seed: int = seed) -> dict[str, Any]:
            return seed_metrics(model, data, device, seed)

        def bar(label: str) -> ProgressCallback | None:
            return progress_factory(label) if progress_factory else None

        original_key, retrain_key = model_cache_keys(config, data)
        original, original_time = cache.get_or_train(
            original_key, spec, data.train, recipe, seed, device, bar(f"seed {seed} original"))
        retrain_model, retrain_time = cache.get_or_train(
            retrain_key, spec, data.retain, recipe, seed, device, bar(f"seed {seed} retrain"))
        if config.retime_epochs:
            retrain_time = retime(spec, data.retain, recipe, config.retime_epochs, seed, device)
        original_metrics = {"seed": seed, **measure(original), **original_time}
        retrain_metrics = {"seed": seed, **measure(retrain_model), **retrain_time}
        originals.append(original_metrics)
        retrains.append(retrain_metrics)
        log(f"seed {seed}: original {_brief(original_metrics)} | retrain "
            f"{_brief(retrain_metrics)}")
        for method in methods:
            if method.name == "retrain":  # the cached gold standard is the retrain run
                metrics, timing, steps, details = retrain_metrics, retrain_time, None, {}
            else:
                result = method.unlearn(original, retain=data.retain, forget=data.forget,
                                        unseen=data.unseen, original_recipe=recipe,
                                        scenario=data.scenario, device=device, seed=seed,
                                        progress=bar(f"seed {seed} {method.name}"))
                metrics = measure(result.model)
                timing = {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds}
                steps = result.steps
                details = {k: v for k, v in result.details.items() if k != "config"}
            run = {"method": method.name, "scenario": config.scenario, "seed": seed,
                   **{k: metrics[k] for k in (*METRIC_KEYS, "mia_ci95", "mia_n")},
                   **timing, "rte": rte(retrain_time[clock], timing[clock]),
                   "retdev": retdev(metrics, retrain_metrics),
                   "mia_gap": abs(metrics["mia_accuracy"] - retrain_metrics["mia_accuracy"]),
                   "steps": steps, **({"forget_class_accuracy": metrics["forget_class_accuracy"]}
                                      if "forget_class_accuracy" in metrics else {}),
                   "details": details}
            runs.append(run)
            log(f"seed {seed} {method.name:8s} {_brief(run)} rte {run['rte']:.1f} "
                f"retdev {run['retdev']:.4f}")
    return {"config": config.to_dict(), "machine": describe_machine(device),
            "rte_clock": clock, "original": summarize_seeds(originals),
            "retrain": summarize_seeds(retrains), "runs": runs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _brief(metrics: dict[str, Any]) -> str:
    text = (f"RA {metrics['retain_accuracy']:.4f} FA {metrics['forget_accuracy']:.4f} "
            f"TA {metrics['test_accuracy']:.4f} MIA {metrics['mia_accuracy']:.4f}")
    if metrics.get("attack_success_rate") is not None:
        text += f" ASR {metrics['attack_success_rate']:.4f}"
    return text + f" {metrics['seconds']:.1f}s"
