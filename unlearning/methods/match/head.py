"""Head-only training: where the classifier head holds most of a model's parameters, match
trains the head alone, and what the frozen body hands the head on a fixed set of samples never
changes, so it is computed once and every later step or check runs the head alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from unlearning.loops import SampleSet, predict_logits
from unlearning.runtime import autocast, eval_mode

# At most this much memory holds the head inputs of the forget set and ``unseen_match``
# (cnn-small: 12.5 kB a sample, so 80 000 samples); past it, every step runs the body.
HEAD_INPUT_CACHE_BYTES = 1 << 30


def classifier_head(model: nn.Module) -> nn.Module:
    for name in ("classifier", "head", "fc"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    return list(model.children())[-1]


def head_logits(head: nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The head's logits (float32, on the CPU) on inputs it would receive, in eval mode."""
    with eval_mode(head), autocast(device):
        return torch.cat([head(part) for part in inputs.split(1024)]).float().cpu()


@contextmanager
def recorded_head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that collects what ``head`` receives while the block runs."""
    received: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: received.append(args[0]))
    try:
        yield received
    finally:
        handle.remove()


def head_inputs(model: nn.Module, head: nn.Module, samples: SampleSet,
                device: torch.device) -> torch.Tensor | None:
    """What ``head`` receives while ``model`` runs on ``samples``; None when the model's
    output is not the head's output on it (a layer runs after the head), so the head cannot
    stand in for the model."""
    with recorded_head_input(head) as captured:
        logits = predict_logits(model, samples, device)
    if len(captured) == 0:
        return None
    inputs = torch.cat(captured)
    probe = slice(0, 128)
    if not torch.allclose(head_logits(head, inputs[probe], device), logits[probe],
                          rtol=1e-4, atol=1e-4):
        return None
    return inputs


class HeadCache:
    """Head inputs of fixed sample sets, so that their logits cost a pass through the head
    alone. Empty (every lookup runs the whole model) when the whole model trains, when the
    head cannot stand in for the model, or when the inputs would not fit in ``budget`` bytes."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.head, self.device = model, classifier_head(model), device
        self._inputs: dict[int, torch.Tensor] = {}
        self.enabled = False

    def fill(self, sets: list[SampleSet], budget: float = float("inf")) -> bool:
        """Cache the head inputs of every set in ``sets``, or of none (returns whether it
        did): all or nothing, so a step never mixes cached and uncached sets."""
        first = head_inputs(self.model, self.head, sets[0].subset(torch.arange(
            min(len(sets[0]), 128))), self.device) if len(sets[0]) else None
        if first is None or first[0].nbytes * sum(len(s) for s in sets) > budget:
            return False
        found = {}
        for samples in sets:
            inputs = head_inputs(self.model, self.head, samples, self.device)
            if inputs is None:
                return False
            found[id(samples)] = inputs
        self._inputs.update(found)
        self.enabled = True
        return True

    def inputs(self, samples: SampleSet) -> torch.Tensor | None:
        return self._inputs.get(id(samples))

    def logits(self, samples: SampleSet) -> torch.Tensor:
        """``model``'s logits on ``samples`` (float32, on the CPU), from the cache when held."""
        inputs = self._inputs.get(id(samples))
        return predict_logits(self.model, samples, self.device) if inputs is None \
            else head_logits(self.head, inputs, self.device)
