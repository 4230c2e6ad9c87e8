"""Unlearning methods, one file each, found by name.

``get_method("match").unlearn(model, retain=..., forget=..., unseen=..., ...)``; every
method has the same signature (see :class:`unlearning.methods.base.UnlearningMethod`) and a
``Config`` dataclass with its published defaults.
"""

from __future__ import annotations

from unlearning.loops import Cancelled
from unlearning.methods.base import (
    MethodConfig,
    UnlearningMethod,
    UnlearningTask,
    UnlearnResult,
)
from unlearning.methods.ct import ConvTranspose
from unlearning.methods.ft import FineTune
from unlearning.methods.ga import GradientAscent
from unlearning.methods.match import Match
from unlearning.methods.msg import MaskedSmallGradients
from unlearning.methods.ngplus import NegGradPlus
from unlearning.methods.retrain import Retrain
from unlearning.methods.salun import SalUn
from unlearning.methods.scrub import Scrub
from unlearning.methods.srl import SuccessiveRandomLabels

METHODS: dict[str, type[UnlearningMethod]] = {
    method.name: method
    for method in (Match, Retrain, FineTune, GradientAscent, NegGradPlus,
                   SuccessiveRandomLabels, Scrub, SalUn, MaskedSmallGradients, ConvTranspose)
}


def get_method(name: str) -> UnlearningMethod:
    """A ready-to-call instance of the method registered as ``name``."""
    try:
        return METHODS[name]()
    except KeyError:
        raise KeyError(f"unknown unlearning method {name!r}; choose from {sorted(METHODS)}") \
            from None


__all__ = ["METHODS", "Cancelled", "MethodConfig", "UnlearnResult", "UnlearningMethod",
           "UnlearningTask", "get_method"]
