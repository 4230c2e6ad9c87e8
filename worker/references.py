"""One delivery of a reference job: train a model's reference models with its recorded recipe
on random halves of its (not forgotten) training samples, store each one's per-sample
statistics as it finishes, and drop its weights. The rules live in app/references/service.py,
the training and measuring in unlearning/verification/references.py."""

from __future__ import annotations

import logging

import numpy as np

from app.datasets import service as datasets
from app.datasets.models import Dataset
from app.models_registry.models import Model, Policy
from app.references import service as references
from app.references.models import ReferenceSet
from unlearning.architectures import build_model
from unlearning.runtime import resolve_device
from unlearning.training import Recipe
from unlearning.verification.references import ReferenceOutput, train_references
from worker.context import WorkerContext
from worker.shared import Heartbeat, load_readable

log = logging.getLogger(__name__)


def build(ctx: WorkerContext, set_id: int) -> str:
    """Returns `ready`, `failed` or `skipped` (finished already, or alive elsewhere)."""
    with ctx.session() as db_session:
        reference_set = db_session.get(ReferenceSet, set_id)
        if reference_set is None:
            return "skipped"
        model = db_session.get(Model, reference_set.model_id)
        assert model is not None
        dataset = db_session.get(Dataset, model.dataset_id)
        assert dataset is not None
        root = ctx.settings.resolved_dataset_dir / dataset.store
        # a sample lost from the store since it was registered is left out (it will have no
        # statistics, so a request for it is answered with the population test): one lost
        # file must not hold every request of the model back
        train = load_readable(root, datasets.held_samples(db_session, dataset_id=dataset.id,
                                                          split="train"))
        holdout_loaded = load_readable(root, datasets.held_samples(
            db_session, dataset_id=dataset.id, split="holdout"))
        unreadable = {**train.broken, **holdout_loaded.broken}
        if unreadable:
            log.warning("reference set %d: %d samples cannot be read and are left out (first: "
                        "%s)", set_id, len(unreadable), next(iter(unreadable.values())))
        train_rows, holdout_rows = train.kept, holdout_loaded.kept
        claimed = references.claim(db_session, set_id=set_id, worker_host=ctx.hostname,
                                   heartbeat_timeout=ctx.settings.heartbeat_timeout_seconds,
                                   n_train=len(train_rows), n_holdout=len(holdout_rows))
        if claimed is None:
            return "skipped"
        claimed_set, done = claimed
        k, seed = claimed_set.n_references, claimed_set.seed
        policy = Policy.model_validate(model.policy)
        architecture, name = model.architecture, model.name
        train_ids = [s.id for s in train_rows]
        holdout_ids = [s.id for s in holdout_rows]
        train_set, holdout = train.samples, holdout_loaded.samples
    log.info("reference set %d of %s: %d models (%d stored already) on %d training samples",
             set_id, name, k, len(done), len(train_ids))

    def store(output: ReferenceOutput) -> None:
        rows = [(train_ids[p], float(v)) for p, v in zip(output.out_positions.tolist(),
                                                          output.out_phi.tolist(), strict=True)]
        rows += [(holdout_ids[p], float(v)) for p, v in zip(output.holdout_positions.tolist(),
                                                             output.holdout_phi.tolist(),
                                                             strict=True)]
        rows = [(sample_id, v) for sample_id, v in rows if np.isfinite(v)]
        with ctx.session() as db_session:
            references.store_reference(db_session, set_id=set_id, index=output.index, rows=rows,
                                       seconds=output.seconds)

    phase: list[str | None] = [None]  # the training's latest phase, written with each beat

    def progress(name: str, step: int, total: int, metrics: dict[str, float]) -> None:
        phase[0] = name

    with Heartbeat(ctx, f"reference set {set_id}", lambda db_session: references.heartbeat(
            db_session, set_id=set_id, phase=phase[0]),
            every=min(ctx.settings.heartbeat_seconds, 5.0)):
        try:
            train_references(
                lambda: build_model(architecture), Recipe(**policy.training_recipe),
                train_set=train_set, holdout=holdout, k=k, seed=seed,
                device=resolve_device(ctx.settings.device), skip=done, on_reference=store,
                progress=progress)
        except Exception as error:
            log.exception("reference set %d failed", set_id)
            with ctx.session() as db_session:
                references.fail(db_session, set_id=set_id,
                                reason=f"{type(error).__name__}: {error}")
            return "failed"
    with ctx.session() as db_session:
        references.finish(db_session, set_id=set_id)
    log.info("reference set %d of %s ready", set_id, name)
    return "ready"
