"""Architectures by name: ``build_model({"name": ..., "kwargs": {...}})``.

Built-in names: ``mlp``, ``cnn-small``, CIFAR-style ``resnet8`` / ``resnet20`` (He et al. 2016,
three stages of 16/32/64 channels) and torchvision's ``resnet18`` with any input channels and
classes. Any other name of the form ``"package.module:factory"`` is imported and called with
the kwargs; callers that accept specs from users pass ``allowed_modules`` so only vetted code
can be imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

ModelSpec = Mapping[str, Any]


class ArchitectureError(ValueError):
    """The spec names no known architecture or its kwargs do not fit."""


class MLP(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * input_size * input_size
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers: fast on a CPU, and able to memorise its training
    set, which is what gives the membership signal something to find."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        if input_size % 4:
            raise ArchitectureError("cnn-small needs an input_size divisible by 4")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (input_size // 4) ** 2, hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem, stages of 16/32/64 channels, global pool."""

    def __init__(self, blocks_per_stage: int, in_channels: int = 3, num_classes: int = 10,
                 input_size: int | None = None) -> None:
        super().__init__()
        del input_size  # any size works thanks to the global pool; accepted for input_shape()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int | None = None,
              cifar_stem: bool = False) -> nn.Module:
    """torchvision's ResNet-18; ``cifar_stem`` swaps the 7x7/2 stem and max-pool for a 3x3/1
    conv, the usual adaptation for 32x32 inputs (slower, more accurate)."""
    from torchvision.models import resnet18

    del input_size
    model = resnet18(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


BUILTIN_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn-small": SmallCNN,
    "resnet8": lambda **kw: CifarResNet(1, **kw),
    "resnet20": lambda **kw: CifarResNet(3, **kw),
    "resnet18": _resnet18,
}
# Models whose first layer fixes the input size; the others pool globally.
_FIXED_INPUT = {"mlp", "cnn-small"}


def _spec_parts(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ArchitectureError("an architecture spec is {'name': str, 'kwargs': {...}}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ArchitectureError("spec kwargs must be a mapping")
    return spec["name"], dict(kwargs)


def build_model(spec: ModelSpec, *, allowed_modules: Collection[str] | None = None) -> nn.Module:
    """Instantiate the architecture ``spec`` names (weights freshly initialised).

    ``allowed_modules``: for ``module:factory`` names, the modules that may be imported; None
    allows any (trusted callers such as the lab), an empty collection allows none."""
    name, kwargs = _spec_parts(spec)
    if name in BUILTIN_ARCHITECTURES:
        factory = BUILTIN_ARCHITECTURES[name]
    elif ":" in name:
        module_name, _, attribute = name.partition(":")
        if allowed_modules is not None and module_name not in allowed_modules:
            raise ArchitectureError(f"module {module_name!r} is not in the allowed factories")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ArchitectureError(f"cannot import factory {name!r}: {error}") from error
    else:
        raise ArchitectureError(f"unknown architecture {name!r}; built-in: "
                                f"{sorted(BUILTIN_ARCHITECTURES)} or 'module:factory'")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ArchitectureError(f"bad kwargs for {name!r}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"factory {name!r} returned {type(model).__name__}, not a module")
    # Convolution weights in channels-last layout: on the CPU (oneDNN) cnn-small trained 1.4 to
    # 1.8 times and evaluated 2.2 times faster, resnet8 1.4 and 1.5 times; inputs need not be
    # converted (the layout follows the weights). Only 4-D tensors change; the weights file
    # is the same (save_weights writes contiguous tensors, loading copies into this layout).
    return model.to(memory_format=torch.channels_last)


def input_shape(spec: ModelSpec) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` a model built from ``spec`` expects, when the spec says:
    always for ``mlp`` / ``cnn-small``, for the ResNets when ``input_size`` is given, and for
    factories when their kwargs carry ``in_channels`` and ``input_size``."""
    name, kwargs = _spec_parts(spec)
    channels = kwargs.get("in_channels", 3 if name.startswith("resnet") else 1)
    size = kwargs.get("input_size", 28 if name in _FIXED_INPUT else None)
    if size is None or (name not in BUILTIN_ARCHITECTURES and "in_channels" not in kwargs):
        return None
    return int(channels), int(size), int(size)
