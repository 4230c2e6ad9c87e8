"""Device choice, seeding and mixed precision: the few lines every loop needs, written once."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for samplers so data order depends
    on this seed alone, not on how many random numbers other code drew before."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast on CUDA (no loss scaler needed); exact float32 on the CPU, where
    autocast would only slow the small models down."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def load_lazy_modules() -> None:
    """Pay, once a process, for what torch imports lazily on first use: the first optimizer it
    builds imports ``torch._dynamo`` (2 s of CPU, 3 s of wall time on a 2-core EPYC). Called
    before a method's clock starts, so it is not billed to whichever method
    happens to come first in a process: with cached originals and retrains, the first method
    of a lab run had paid it (2 s of the 13 s match takes on the full training set). Training
    builds its optimizer before its clock starts and needs no call."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def limit_cpu_threads() -> None:
    """Honour LETHE_TORCH_THREADS so long CPU runs can leave cores to other work."""
    threads = os.environ.get("LETHE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Evaluate without gradients and restore the model's train/eval flags afterwards."""
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in zip(model.modules(), was_training, strict=True):
            module.train(flag)
