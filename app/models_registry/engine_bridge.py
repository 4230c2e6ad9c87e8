"""The control plane's calls into the unlearning engine, for validating what clients register.

Kept in one place so the API layer's dependency on the engine is visible and small."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


def method_names() -> set[str]:
    from unlearning.methods import METHODS

    return set(METHODS)


def check_method_config(method: str, config: dict[str, Any]) -> None:
    """Raise ValueError unless ``config`` only sets fields the method's Config has, each to a
    value of its type, so a job does not trip over it later (JSON's rules, strictly: an int
    stands for a float, a bool is no number, null only where the field allows it)."""
    from pydantic import TypeAdapter, ValidationError

    from unlearning.methods import METHODS

    config_class = METHODS[method].Config
    try:
        config_class(**config)  # unknown fields
        TypeAdapter(config_class).validate_json(json.dumps(config), strict=True)
    except TypeError as exc:
        raise ValueError(f"method_config for {method!r}: {exc}") from None
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
                          for error in exc.errors())
        raise ValueError(f"method_config for {method!r}: {wrong}") from None


def check_training_recipe(recipe: dict[str, Any]) -> None:
    from unlearning.training import Recipe

    try:
        Recipe(**recipe)
    except TypeError as exc:
        raise ValueError(f"training_recipe: {exc}") from None


@dataclass(frozen=True)
class ArchitectureProbe:
    """What building an architecture once told: its size and, where an input shape is known
    (the dataset's samples, or the spec's own kwargs), the classes it predicts."""

    parameters: int
    input_shape: tuple[int, int, int] | None
    classes: int | None


def probe_architecture(spec: dict[str, Any], allowed_factories: list[str] | None, *,
                       sample_shape: tuple[int, int, int] | None = None,
                       max_parameters: int | None = None) -> ArchitectureProbe:
    """Build the architecture to prove the spec is valid, and pass one dummy input through it;
    raise ValueError saying what does not fit.

    The parameters are counted on PyTorch's meta device first (no memory allocated), so a spec
    that would exhaust memory is refused before it is built. ``module:factory`` specs import
    code, so over the API only modules the operator listed in LETHE_MODEL_FACTORY_MODULES are
    accepted."""
    import torch

    from unlearning.architectures import ArchitectureError, build_model, input_shape

    def build(device: str) -> torch.nn.Module:
        try:
            with torch.device(device):
                return build_model(spec, allowed_modules=allowed_factories)
        except ArchitectureError:
            raise
        except Exception as exc:  # a factory that fails to build is the spec's fault too
            raise ValueError(f"{type(exc).__name__}: {exc}") from None

    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def check_size(parameters: int) -> None:
        if max_parameters is not None and parameters > max_parameters:
            raise ValueError(f"{parameters:,} parameters; this service accepts at most "
                             f"{max_parameters:,} (LETHE_MAX_MODEL_PARAMETERS)")

    try:
        on_meta: int | None = count(build("meta"))
    except ArchitectureError:
        raise
    except ValueError:  # a factory that computes on tensors while it builds needs real ones
        on_meta = None
    if on_meta is not None:
        check_size(on_meta)
    model = build("cpu")
    parameters = count(model)
    check_size(parameters)
    declared = input_shape(spec)
    if sample_shape is not None and declared is not None and declared != sample_shape:
        raise ValueError(f"the architecture takes inputs shaped {list(declared)} (from its "
                         f"kwargs) but the dataset's samples are {list(sample_shape)}")
    shape = sample_shape or declared
    classes = None
    if shape is not None:
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *shape))
        except Exception as exc:
            raise ValueError(f"a dummy batch shaped {[2, *shape]} does not pass through the "
                             f"model: {type(exc).__name__}: {exc}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must return logits shaped [N, classes]; for a batch "
                             f"of 2 it returned {got}")
        classes = int(out.shape[1])
    return ArchitectureProbe(parameters, shape, classes)


@lru_cache(maxsize=256)
def _classes(spec_json: str, shape: tuple[int, int, int] | None,
             allowed: tuple[str, ...]) -> int | None:
    return probe_architecture(json.loads(spec_json), list(allowed), sample_shape=shape).classes


def output_classes(spec: dict[str, Any], shape: tuple[int, int, int] | None,
                   allowed_factories: list[str]) -> int | None:
    """How many classes a registered architecture predicts on inputs of ``shape`` (cached:
    a manifest upload asks it for every model on the dataset)."""
    return _classes(json.dumps(spec, sort_keys=True), shape, tuple(allowed_factories))


def check_weights_file(path: Path, spec: dict[str, Any]) -> None:
    """Raise ValueError unless ``path`` is a safetensors file whose tensors fit ``spec`` and
    that loads: the engine's check reads the header alone, so a file whose tensor bytes are
    missing or whose offsets point past its end would pass it, become a version, and fail only
    when served. safetensors' own parser checks the offsets against the file (memory-mapped;
    no tensor is read and nothing is executed)."""
    from safetensors import safe_open

    from unlearning.weights import check_weights_file as check

    try:
        check(path, spec)
        with safe_open(str(path), framework="pt"):
            pass
    except ValueError:
        raise
    except Exception as exc:  # a header built to break the parser is the file's fault too
        raise ValueError(f"not a loadable safetensors file: {type(exc).__name__}: {exc}"
                         ) from None


def check_reference_count(k: int) -> int:
    """``k`` if a reference set may have that many models (the engine's rule), else
    ValueError saying why."""
    from unlearning.verification.references import check_reference_count as check

    return check(k)


def reference_rows(k: int, half: str) -> list[int]:
    """The indices of a ``k``-model reference set's ``half`` (``"gate"`` or ``"method"``),
    by the engine's rule (``half_of``)."""
    from unlearning.verification.references import half_of

    return [index for index in range(k) if half_of(index, k) == half]
