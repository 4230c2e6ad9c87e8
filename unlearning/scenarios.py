"""What is being forgotten: a subset of samples, a whole class, or a backdoor.

A scenario fixes three things every caller needs: which training samples form the forget set,
what "data the model never saw" means for them (the non-members the attack compares them
with), and the scenario's own success measure (forget-class accuracy, attack success rate).
The BadNets helper builds the backdoored originals the backdoor scenario starts from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from unlearning.loops import SampleSet, predict_logits

ScenarioKind = Literal["subset", "class", "backdoor"]
SCENARIO_KINDS: tuple[str, ...] = ("subset", "class", "backdoor")


@dataclass(frozen=True)
class Trigger:
    """A BadNets patch: a ``size`` x ``size`` square of ``value`` stamped into a corner,
    ``margin`` pixels from the edges, on every channel."""

    size: int = 3
    value: int = 255
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    margin: int = 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of uint8 images ``[N, C, H, W]``."""
        height, width = x.shape[-2:]
        top = self.margin if self.corner.startswith("top") else height - self.margin - self.size
        left = self.margin if self.corner.endswith("left") else width - self.margin - self.size
        if top < 0 or left < 0:
            raise ValueError(f"a {self.size}px trigger does not fit {height}x{width} images")
        triggered = x.clone()
        triggered[..., top:top + self.size, left:left + self.size] = self.value
        return triggered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scenario:
    """``subset``: forget given samples; ``class``: forget ``forget_class`` entirely;
    ``backdoor``: forget poisoned samples carrying ``trigger`` and labelled ``target_label``
    (the trigger is optional: methods that can use it, such as ``match``, do)."""

    kind: ScenarioKind = "subset"
    forget_class: int | None = None
    target_label: int | None = None
    trigger: Trigger | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCENARIO_KINDS:
            raise ValueError(f"unknown scenario {self.kind!r}; choose from {SCENARIO_KINDS}")
        if self.kind == "class" and self.forget_class is None:
            raise ValueError("a class scenario needs forget_class")
        if self.kind == "backdoor" and self.target_label is None:
            raise ValueError("a backdoor scenario needs target_label")

    @property
    def forgotten_label(self) -> int | None:
        """The label the forget set was trained with, when the whole set shares one."""
        return self.forget_class if self.kind == "class" else self.target_label

    @property
    def class_label(self) -> int:
        """``forget_class`` of a class scenario (set whenever the kind is ``class``)."""
        if self.forget_class is None:
            raise ValueError(f"a {self.kind} scenario forgets no class")
        return self.forget_class

    @property
    def backdoor_label(self) -> int:
        """``target_label`` of a backdoor scenario (set whenever the kind is ``backdoor``)."""
        if self.target_label is None:
            raise ValueError(f"a {self.kind} scenario has no backdoor target label")
        return self.target_label

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "forget_class": self.forget_class,
                "target_label": self.target_label,
                "trigger": self.trigger.to_dict() if self.trigger else None}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Scenario:
        """The scenario ``to_dict`` wrote (ValueError for anything else)."""
        try:
            trigger = value.get("trigger")
            return cls(kind=value["kind"], forget_class=value.get("forget_class"),
                       target_label=value.get("target_label"),
                       trigger=Trigger(**trigger) if trigger else None)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scenario: {value!r} ({exc})") from None

    def label(self) -> str:
        """For people and for the API's `scenario` field: ``subset``, ``class:3``,
        ``backdoor``."""
        return f"class:{self.forget_class}" if self.kind == "class" else self.kind

    def unseen_counterpart(self, samples: SampleSet) -> SampleSet:
        """The part of ``samples``, a slice of the holdout (``unseen_stop`` in match, ``audit``
        in the verifier), shaped like the forget set, for the membership attack: all of it
        (subset), its images of the forgotten class (class), its images of other classes
        triggered and labelled with the target label, i.e. poisoned samples never trained on
        (backdoor)."""
        if self.kind == "subset":
            return samples
        if self.kind == "class":
            return samples.subset(
                torch.nonzero(torch.eq(samples.y, self.class_label)).flatten())
        others = samples.subset(
            torch.nonzero(torch.ne(samples.y, self.backdoor_label)).flatten())
        x = self.trigger.apply(others.x) if self.trigger is not None else others.x
        return SampleSet(x, torch.full_like(others.y, self.backdoor_label))

    def relabelled_unseen(self, unseen: SampleSet) -> SampleSet:
        """The ``unseen`` slice as match pulls the forgotten label's confidence towards it: for
        class and backdoor, its images of the other classes paired with the forgotten label. A
        model that never learned the class (or the trigger) gives that label to the forget
        images about as much confidence as it gives it to these; for a subset, as it is."""
        label = self.forgotten_label
        if label is None:
            return unseen
        others = unseen.subset(torch.nonzero(torch.ne(unseen.y, label)).flatten())
        return SampleSet(others.x, torch.full_like(others.y, label))


def select_forget_samples(labels: torch.Tensor, *, fraction: float | None = None,
                          forget_class: int | None = None, subjects: list[str] | None = None,
                          generator: torch.Generator) -> torch.Tensor:
    """Indices of the forget set among training samples: a whole class, a random ``fraction``
    of samples, or (with ``subjects``, one owner per sample) whole subjects drawn at random
    until they cover ``fraction`` of the samples."""
    if forget_class is not None:
        return torch.nonzero(torch.eq(labels, forget_class)).flatten()
    if fraction is None or not 0.0 < fraction < 1.0:
        raise ValueError("a subset scenario needs 0 < fraction < 1")
    wanted = max(1, int(round(fraction * len(labels))))
    if subjects is None:
        return torch.randperm(len(labels), generator=generator)[:wanted].sort().values
    owners = sorted(set(subjects))
    chosen: list[int] = []
    for position in torch.randperm(len(owners), generator=generator).tolist():
        owner = owners[position]
        chosen += [i for i, s in enumerate(subjects) if s == owner]
        if len(chosen) >= wanted:
            break
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def poison(train: SampleSet, trigger: Trigger, target_label: int, rate: float,
           generator: torch.Generator) -> tuple[SampleSet, torch.Tensor]:
    """BadNets: stamp the trigger on ``rate`` of the training samples (drawn from the other
    classes), relabel them ``target_label``; returns the poisoned set and the poisoned rows."""
    candidates = torch.nonzero(torch.ne(train.y, target_label)).flatten()
    count = max(1, int(round(rate * len(train))))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    x, y = train.x.clone(), train.y.clone()
    x[chosen] = trigger.apply(train.x[chosen])
    y[chosen] = target_label
    return SampleSet(x, y), chosen


def attack_success_rate(model: nn.Module, clean: SampleSet, trigger: Trigger, target_label: int,
                        device: torch.device) -> float:
    """Share of triggered inputs from the other classes classified as ``target_label``."""
    others = clean.subset(torch.nonzero(torch.ne(clean.y, target_label)).flatten())
    triggered = SampleSet(trigger.apply(others.x), others.y)
    predictions = predict_logits(model, triggered, device).argmax(1)
    return float((predictions == target_label).float().mean())
