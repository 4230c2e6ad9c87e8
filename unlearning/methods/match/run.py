"""match's run, top to bottom: resolve the settings, cut ``unseen`` in two, set the targets,
then fine-tune with the matching pull and the utility guards, checking every few steps
whether the forget set still stands out, and keep the model that stopped blind (or else the
best useful checkpoint)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.loops import (
    RunContext,
    SampleSet,
    forward_parts,
    freeze_norm_statistics,
    predict_logits,
    sgd,
    to_inputs,
)
from unlearning.methods.base import RunOutcome, UnlearningMethod, UnlearningTask
from unlearning.methods.match.config import (
    MatchConfig,
    resolve_statistic,
    resolve_stopping,
    resolve_trainable,
)
from unlearning.methods.match.head import (
    HEAD_INPUT_CACHE_BYTES,
    HeadCache,
    classifier_head,
    recorded_head_input,
)
from unlearning.methods.match.statistics import (
    PerSampleTargets,
    anchor_penalty,
    label_statistic,
    quantile_targets,
    wasserstein_to_targets,
)
from unlearning.methods.match.stopping import StoppingRule, steps_to_next_check
from unlearning.runtime import autocast


def cycle_indices(n: int, batch_size: int, generator: torch.Generator,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over ``range(n)``."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


@dataclass
class Slices:
    """What a run reads (docs/methods.md, "Data slices"). ``pulled``: the samples the matching
    pull acts on (the forget set; for a class, with unseen_match's own images of the class);
    ``unseen_match``: the part of ``unseen`` matched against, relabelled for class and
    backdoor; ``rule``: the stopping rule with its check sets, on ``unseen_stop``."""

    pulled: SampleSet
    unseen_match: SampleSet
    rule: StoppingRule


def _slices(model: nn.Module, task: UnlearningTask, config: MatchConfig, cache: HeadCache,
            *, device: torch.device, generator: torch.Generator,
            seed: int) -> tuple[Slices, torch.Tensor, PerSampleTargets | None]:
    """Cut ``unseen`` in two, draw the forget check, and set the per-sample targets when the
    task has references. Also returns the original's logits on unseen_match."""
    assert config.check_size is not None and config.stopping_fraction is not None
    scenario = task.scenario
    order = torch.randperm(len(task.unseen), generator=generator).to(task.unseen.y.device)
    cut = int(len(order) * (1 - config.stopping_fraction))
    match_part, stop_part = task.unseen.subset(order[:cut]), task.unseen.subset(order[cut:])
    unseen_match = scenario.relabelled_unseen(match_part)
    check_positions = torch.randperm(len(task.forget), generator=generator)[:config.check_size]
    forget_check = task.forget.subset(check_positions.to(task.forget.y.device))
    # the unseen images with their true labels, for the utility veto
    true_labels = stop_part.y.cpu() if scenario.forgotten_label is None else \
        stop_part.y[stop_part.y != scenario.forgotten_label].cpu()
    original_logits = predict_logits(model, unseen_match, device).to(device)
    targets = None
    if task.references is not None and _per_sample(config, task):
        positions = order.cpu().numpy()
        targets = PerSampleTargets.fit(
            task.references, original_phi_match=label_statistic(
                original_logits, unseen_match.y, "confidence").cpu().numpy(),
            match_positions=positions[:cut], stop_positions=positions[cut:])
    # Class: a model that never learned the class treats the class's unseen images like its
    # forgotten ones, so unseen_match's own images of the class are pulled too (pulling only
    # the forget set left unseen images of the class more confident than forgotten ones,
    # which the attack read: 0.60 against the retrain's 0.50).
    pulled = task.forget if scenario.kind != "class" else \
        SampleSet.concat(task.forget, scenario.unseen_counterpart(match_part))
    rule = StoppingRule(
        config=config, cache=cache, forget_check=forget_check,
        forget_check_positions=check_positions, unseen_stop=scenario.relabelled_unseen(
            stop_part), stop_true_labels=true_labels,
        counterpart=None if scenario.forgotten_label is None else
        scenario.unseen_counterpart(stop_part), per_sample=targets, seed=seed)
    return Slices(pulled, unseen_match, rule), original_logits, targets


def _per_sample(config: MatchConfig, task: UnlearningTask) -> bool:
    if config.per_sample not in ("on", "off"):
        raise ValueError(f"unknown per_sample {config.per_sample!r}")
    return config.per_sample == "on" and task.scenario.forgotten_label is None


def _optimizer(model: nn.Module, config: MatchConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return sgd(trainable, config.lr, config.momentum, config.weight_decay)


class Match(UnlearningMethod):
    name = "match"
    Config = MatchConfig

    def run(self, model: nn.Module, task: UnlearningTask, config: MatchConfig, *,
            ctx: RunContext, device: torch.device, generator: torch.Generator,
            seed: int) -> RunOutcome:
        # 1. Settings for this task.
        subset_size = len(task.forget) if task.scenario.forgotten_label is None else None
        config = resolve_stopping(replace(config, statistic=resolve_statistic(
            config, subset_size)), subset_size)
        if config.target not in ("original", "current"):
            raise ValueError(f"unknown target {config.target!r}")
        trainable = resolve_trainable(config, model)
        original = copy.deepcopy(model).eval()
        for parameter in original.parameters():
            parameter.requires_grad_(False)

        # 2. Slices and targets. Per sample: each forget sample's own expected never-seen
        # value of the confidence; by distribution: the original's statistic on unseen_match.
        cache = HeadCache(model, device)
        slices, anchor_logits, per_sample = _slices(model, task, config, cache, device=device,
                                                    generator=generator, seed=seed)
        statistic = "confidence" if per_sample is not None else config.statistic

        def statistic_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return label_statistic(logits, labels, statistic, config.statistic_margin)

        def anchor(logits: torch.Tensor, reference: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
            return anchor_penalty(logits, reference, labels, kind=config.anchor_loss,
                                  statistic=config.anchor_statistic or statistic,
                                  margin=config.statistic_margin, distance=config.distance)

        unseen_statistic = statistic_of(anchor_logits, slices.unseen_match.y)
        rule = slices.rule

        # 3. Head only: what the frozen body hands the head on the check sets, the pulled
        # samples and unseen_match never changes, so it is computed once; a step then runs
        # the body on the retain batch alone (whose head input serves the original's head
        # too: the two bodies are the same).
        if trainable == "head":
            cache.fill(rule.sets)
            cache.fill([slices.pulled, slices.unseen_match], budget=HEAD_INPUT_CACHE_BYTES)
        pulled_inputs, unseen_inputs = cache.inputs(slices.pulled), \
            cache.inputs(slices.unseen_match)

        # 4. Already indistinguishable: return the model unchanged, unless the policy asks
        # for at least ``min_steps``.
        baseline = rule.check()
        history: list[dict[str, float]] = [{"step": 0, **baseline}]
        details: dict[str, Any] = {"statistic": statistic, "trainable": trainable,
                                   "stopping_rule": rule.kind,
                                   "cached_head_inputs": pulled_inputs is not None}
        if per_sample is not None:
            details["per_sample"] = {"slope": per_sample.slope,
                                     "intercept": per_sample.intercept,
                                     "spread": per_sample.spread}
        if baseline["blind"] and task.min_steps <= 0:
            return RunOutcome(0, {**details, "stopped": "already-blind", "checks": history})

        # 5. Fine-tune.
        if trainable == "head":
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            for parameter in classifier_head(model).parameters():
                parameter.requires_grad_(True)
        optimizer = _optimizer(model, config)
        initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best_state: dict[str, torch.Tensor] | None = None
        best_gap, streak, stopped = baseline["gap"], 0, "budget"
        forget_order = cycle_indices(len(slices.pulled), config.forget_batch_size, generator,
                                     device)
        unseen_order = cycle_indices(len(slices.unseen_match),
                                     config.reference_batch_size or config.forget_batch_size,
                                     generator, device)
        retain_order = cycle_indices(len(task.retain), config.retain_batch_size, generator,
                                     device)
        head, original_head = classifier_head(model), classifier_head(original)
        model.train()
        freeze_norm_statistics(model)
        step, next_check = 0, config.check_every
        for step in range(1, config.max_steps + 1):
            forget_index, unseen_index = next(forget_order), next(unseen_order)
            retain_index = next(retain_order)
            x_r, y_r = to_inputs(task.retain.x[retain_index], device), task.retain.y[retain_index]
            y_f = slices.pulled.y[forget_index]
            y_u = slices.unseen_match.y[unseen_index]
            with autocast(device):
                original_logits: torch.Tensor | None = None
                if pulled_inputs is not None and unseen_inputs is not None:
                    forget_logits = head(pulled_inputs[forget_index])
                    unseen_logits = head(unseen_inputs[unseen_index])
                    with recorded_head_input(head) as retain_inputs:
                        retain_logits = model(x_r)
                    with torch.no_grad():
                        original_logits = original_head(retain_inputs[0])
                else:
                    x_f = to_inputs(slices.pulled.x[forget_index], device)
                    x_u = to_inputs(slices.unseen_match.x[unseen_index], device)
                    forget_logits, retain_logits, unseen_logits = forward_parts(
                        model, [x_f, x_r, x_u], device)
                # the matching pull
                if per_sample is not None:
                    null = None if config.target == "original" else per_sample.scores(
                        statistic_of(unseen_logits.detach(), y_u),
                        per_sample.match_expected.to(device)[unseen_index])
                    loss = config.match_weight * per_sample.pull(
                        statistic_of(forget_logits, y_f), forget_index, config.distance, null)
                else:
                    if config.target == "original":
                        targets = quantile_targets(unseen_statistic, len(y_f))
                    else:  # the current model's view of unseen data, fixed for this step
                        targets = quantile_targets(statistic_of(unseen_logits.detach(), y_u),
                                                   len(y_f))
                    loss = config.match_weight * wasserstein_to_targets(
                        statistic_of(forget_logits, y_f), targets, config.distance)
                # the utility guards: retain cross-entropy, unseen and retain predictions
                # anchored to the original's
                loss = loss + config.retain_weight * F.cross_entropy(retain_logits, y_r)
                if config.anchor_weight:
                    loss = loss + config.anchor_weight * anchor(
                        unseen_logits, anchor_logits[unseen_index], y_u)
                if config.distill_weight:
                    if original_logits is None:
                        with torch.no_grad():
                            original_logits = original(x_r)
                    loss = loss + config.distill_weight * anchor(retain_logits,
                                                                 original_logits, y_r)
            if not torch.isfinite(loss):
                # Diverged despite the clip: what the model holds now is no use. Fall back to
                # the best useful checkpoint, or to where it started.
                stopped = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
            optimizer.step()
            metrics: dict[str, Any] = {"loss": float(loss.detach())}
            if step < next_check:
                ctx.step("match", step, config.max_steps, metrics)
                continue
            # 6. A check: keep the best useful checkpoint; stop after ``patience`` blind
            # checks in a row, once ``min_steps`` are done.
            result = rule.check()
            model.train()
            freeze_norm_statistics(model)
            history.append({"step": step, **result})
            metrics.update(result)
            useful = baseline["holdout_accuracy"] - result["holdout_accuracy"] \
                <= config.max_accuracy_drop
            if useful and result["gap"] < best_gap:
                best_gap = result["gap"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            streak = streak + 1 if useful and result["blind"] else 0
            ctx.step("match", step, config.max_steps, metrics, force=True)
            if streak >= config.patience and step >= task.min_steps:
                stopped = "blind"
                break
            next_check = step + steps_to_next_check(history, config, tolerance=rule.tolerance)
        if stopped != "blind":
            # the best useful checkpoint, not the last; none was useful (every check lost
            # too much accuracy) or the loss diverged: the model as it started
            model.load_state_dict(best_state if best_state is not None else initial_state)
        return RunOutcome(step, {**details, "stopped": stopped, "checks": history,
                                 "best_attack_gap": best_gap})
