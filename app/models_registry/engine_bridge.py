"""The control plane's calls into the unlearning engine, for validating what clients register.

Kept in one place so the API layer's dependency on the engine is visible and small."""

from __future__ import annotations

import json
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


def check_architecture(spec: dict[str, Any], allowed_factories: list[str]) -> None:
    """Build the architecture once to prove the spec is valid; raise ValueError if not.

    ``module:factory`` specs import code, so over the API only modules the operator listed in
    LETHE_MODEL_FACTORY_MODULES are accepted."""
    from unlearning.architectures import build_model

    try:
        build_model(spec, allowed_modules=allowed_factories)
    except ValueError:
        raise
    except Exception as exc:  # a factory that fails to build is the spec's fault too
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


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
