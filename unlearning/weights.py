"""Model weights in and out as safetensors, and only safetensors.

Nothing here calls ``torch.load`` or unpickles: a file is accepted only if its header parses as
safetensors, and :func:`check_weights_file` compares the header's tensor names, shapes and
dtypes with an architecture before a single tensor byte is read, so the API can refuse an
upload that does not fit without executing anything from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unlearning.architectures import ModelSpec, build_model
from unlearning.atomic import atomic_write

# safetensors dtype codes for the dtypes a state dict holds
_DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_MAX_HEADER_BYTES = 100 * 2**20

Signature = dict[str, tuple[tuple[int, ...], str]]


class WeightsError(ValueError):
    """Not a safetensors file, or tensors that do not fit the architecture."""


def state_dict_signature(model_or_spec: nn.Module | ModelSpec) -> Signature:
    """``{tensor name: (shape, safetensors dtype)}`` of a model's state dict."""
    model = model_or_spec if isinstance(model_or_spec, nn.Module) else build_model(model_or_spec)
    return {name: (tuple(t.shape), _DTYPE_CODES[t.dtype])
            for name, t in model.state_dict().items()}


def read_signature(path: str | os.PathLike[str]) -> tuple[Signature, dict[str, str]]:
    """Tensor names, shapes and dtypes plus metadata, from the header alone."""
    with Path(path).open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError("not a safetensors file: too short")
        (header_len,) = struct.unpack("<Q", prefix)
        if not 2 <= header_len <= _MAX_HEADER_BYTES:
            raise WeightsError("not a safetensors file: implausible header length")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError("not a safetensors file: header is not JSON") from error
    if not isinstance(header, dict):
        raise WeightsError("not a safetensors file: header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    try:
        signature = {name: (tuple(int(d) for d in info["shape"]), str(info["dtype"]))
                     for name, info in header.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError("not a safetensors file: malformed tensor entry") from error
    return signature, dict(metadata)


def signature_mismatches(expected: Signature, actual: Signature) -> list[str]:
    """Human-readable differences; empty when the file fits."""
    problems = [f"missing tensor {n}" for n in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected tensor {n}" for n in sorted(actual.keys() - expected.keys())]
    for name in sorted(expected.keys() & actual.keys()):
        (want_shape, want_dtype), (got_shape, got_dtype) = expected[name], actual[name]
        if want_shape != got_shape:
            problems.append(f"{name}: shape {list(got_shape)}, expected {list(want_shape)}")
        elif want_dtype != got_dtype:
            problems.append(f"{name}: dtype {got_dtype}, expected {want_dtype}")
    return problems


def check_weights_file(path: str | os.PathLike[str],
                       model_or_spec: nn.Module | ModelSpec) -> None:
    """Raise :class:`WeightsError` listing every mismatch between the file and the model."""
    actual, _ = read_signature(path)
    problems = signature_mismatches(state_dict_signature(model_or_spec), actual)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more"
                                            if len(problems) > 10 else "")
        raise WeightsError(f"weights do not fit the architecture: {shown}")


def save_weights(model: nn.Module, path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write the state dict atomically (:func:`unlearning.atomic.atomic_write`). Tensors are
    cloned so tied parameters are stored under each name and reload with ``strict=True``."""
    target = Path(path)
    tensors = {name: t.detach().to("cpu").clone().contiguous()
               for name, t in model.state_dict().items()}
    with atomic_write(target) as temp:
        save_file(tensors, str(temp), metadata=dict(metadata or {}))
    return target


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Check the file against ``model`` from its header, then load it strictly."""
    check_weights_file(path, model)
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model


def tensor_sha256(model: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in name order: equal
    exactly when the weights are, whatever metadata a file's header carries."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
