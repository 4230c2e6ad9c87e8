"""Every method runs in every scenario on the CPU, through the same entry point, reporting
progress and stopping when cancelled; the registry and configs behave as documented."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from typing import TypeVar

import pytest
import torch

from tests.unlearning.conftest import CPU, World
from unlearning.loops import evaluate
from unlearning.methods import METHODS, Cancelled, get_method
from unlearning.methods.base import MethodConfig
from unlearning.methods.ct import ConvTransposeConfig
from unlearning.methods.ft import FineTuneConfig
from unlearning.methods.match import MatchConfig
from unlearning.methods.msg import MaskedSmallGradientsConfig
from unlearning.methods.ngplus import NegGradPlusConfig
from unlearning.methods.scrub import ScrubConfig

BASELINES = sorted(set(METHODS) - {"match"})
# Small budgets: this checks that each algorithm runs end to end in each scenario, not how
# well it unlearns (that is the lab's job).
QUICK = {"epochs": 1, "max_steps": 1}
C = TypeVar("C", bound=MethodConfig)


def quick_config(name: str) -> MethodConfig:
    config = METHODS[name].Config()
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in QUICK.items() if k in fields})


def as_config(config: MethodConfig, kind: type[C]) -> C:
    """``config``, checked to be a ``kind`` (the registry and ``stronger()`` are typed with the
    base class)."""
    assert isinstance(config, kind), config
    return config


def test_registry_holds_the_seed_method_and_every_baseline() -> None:
    assert set(METHODS) == {"match", "retrain", "ft", "ga", "ngplus", "srl", "scrub", "salun",
                            "msg", "ct"}
    with pytest.raises(KeyError, match="unknown unlearning method"):
        get_method("forget-harder")


def test_published_defaults_and_stronger_settings() -> None:
    assert as_config(METHODS["ngplus"].Config(), NegGradPlusConfig).alpha == 0.95
    assert as_config(METHODS["msg"].Config(), MaskedSmallGradientsConfig).reinit_rate == 0.3
    assert as_config(METHODS["scrub"].Config(), ScrubConfig).temperature == 2.0
    ft = as_config(METHODS["ft"].Config(), FineTuneConfig)
    ft_stronger = as_config(ft.stronger(), FineTuneConfig)
    assert ft_stronger.epochs == 2 * ft.epochs and ft_stronger.lr == ft.lr
    match = as_config(METHODS["match"].Config(), MatchConfig)
    assert match.stronger().max_steps > match.max_steps
    assert match.stronger().attack_features == "strong"


@pytest.mark.parametrize("scenario", ["subset", "class", "backdoor"])
@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_runs_in_every_scenario(name: str, scenario: str, subset_world: World,
                                               class_world: World,
                                               backdoor_world: World) -> None:
    world = {"subset": subset_world, "class": class_world, "backdoor": backdoor_world}[scenario]
    data = world.data
    before = {k: v.clone() for k, v in world.original.state_dict().items()}
    phases: list[str] = []
    result = get_method(name).unlearn(
        world.original, retain=data.retain, forget=data.forget, unseen=data.unseen,
        original_recipe=world.recipe.with_(epochs=1), scenario=data.scenario,
        config=quick_config(name), device="cpu", seed=0,
        progress=lambda phase, step, total, metrics: phases.append(phase))
    assert result.steps > 0 and result.seconds > 0 and phases
    assert result.model is not world.original
    changed = any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert changed, f"{name} left the weights untouched"
    assert all(torch.equal(before[k], v) for k, v in world.original.state_dict().items())
    accuracy = evaluate(result.model, data.test, CPU)["accuracy"]
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("name", ["match", "ft", "scrub"])
def test_a_cancelled_run_stops_with_cancelled(name: str, subset_world: World) -> None:
    data = subset_world.data
    stop = threading.Event()
    steps_seen: list[int] = []

    def progress(phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        steps_seen.append(step)
        stop.set()  # ask to stop after the first report

    with pytest.raises(Cancelled):
        get_method(name).unlearn(subset_world.original, retain=data.retain,
                                 forget=data.forget, unseen=data.unseen,
                                 scenario=data.scenario, device="cpu", progress=progress,
                                 cancel=stop)
    assert len(steps_seen) <= 2


@pytest.mark.parametrize(("lr", "stopped"), [(1e9, "diverged"), (1e6, "budget")])
def test_match_that_diverges_hands_back_a_usable_model_not_nans(
        lr: float, stopped: str, subset_world: World) -> None:
    """An absurd step size, with the gradient clip off, sends the loss to inf or NaN within a
    few steps (lr 1e9), or keeps it finite but wrecks the model so that no check is useful
    (lr 1e6: the loss near 1e7, unseen accuracy 0.1); either way match must return the best
    useful checkpoint, here where it started, never the wreck."""
    data = subset_world.data
    config = dataclasses.replace(as_config(METHODS["match"].Config(), MatchConfig), lr=lr,
                                 max_grad_norm=None, max_steps=50)
    result = get_method("match").unlearn(
        subset_world.original, retain=data.retain, forget=data.forget,
        unseen=data.unseen, scenario=data.scenario, config=config, device="cpu")
    assert result.details["stopped"] == stopped
    assert result.steps < 50 if stopped == "diverged" else result.steps == 50
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values()
               if v.is_floating_point())
    before = evaluate(subset_world.original, data.unseen, CPU)
    after = evaluate(result.model, data.unseen, CPU)
    assert after == pytest.approx(before)


def test_a_method_clock_does_not_bill_torch_lazy_imports(
        subset_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch imports torch._dynamo when it builds its first optimizer (2 s of CPU): paid
    before a method's clock starts, or the first method of a process (cached originals and
    retrains) is billed for it and its RTE understated."""
    probe = ("import sys, torch\n"
             "assert 'torch._dynamo' not in sys.modules\n"
             "from unlearning.runtime import load_lazy_modules\n"
             "load_lazy_modules()\n"
             "assert 'torch._dynamo' in sys.modules\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)

    import unlearning.methods.base as base

    events: list[str] = []
    clock = base.time.perf_counter
    monkeypatch.setattr(base, "load_lazy_modules", lambda: events.append("warm-up"))

    def billed_clock() -> float:
        events.append("clock")
        return clock()

    monkeypatch.setattr(base.time, "perf_counter", billed_clock)
    data = subset_world.data
    get_method("ga").unlearn(subset_world.original, retain=data.retain, forget=data.forget,
                             unseen=data.unseen, scenario=data.scenario, device="cpu",
                             config=quick_config("ga"))
    assert events[:2] == ["warm-up", "clock"]



@pytest.mark.parametrize(("name", "epochs", "multipliers"), [
    ("ct", 3, [1.0, 0.75, 0.25]),  # CosineAnnealingLR(T_max=3) stepped per epoch
    ("msg", 5, [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]),
])
def test_ct_and_msg_change_their_learning_rate_per_epoch_as_deep_unlearn_does(
        name: str, epochs: int, multipliers: list[float], subset_world: World,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep Unlearn steps these schedules once per epoch (kgltop5.py, kgltop2.py): every step
    of an epoch uses the epoch's multiplier, none reaches 0."""
    seen: list[float] = []
    step = torch.optim.SGD.step

    def recording(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    data = subset_world.data
    retain = data.retain.subset(torch.arange(256))
    config = METHODS[name].Config()
    assert isinstance(config, ConvTransposeConfig | MaskedSmallGradientsConfig)
    result = get_method(name).unlearn(subset_world.original, retain=retain, forget=data.forget,
                                      unseen=data.unseen, config=config, device=CPU, seed=0)
    per_epoch = len(seen) // epochs
    assert result.steps == len(seen) == per_epoch * epochs
    lr = config.lr
    for epoch, multiplier in enumerate(multipliers):
        rates = seen[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert rates == pytest.approx([lr * multiplier] * per_epoch), (epoch, rates[:3])
