"""A model owner's own architecture, as `tests.api.custom_architecture:build`: its kwargs do
not say what input it takes, so only the dataset's sample shape can."""

from __future__ import annotations

from torch import nn


def build(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
