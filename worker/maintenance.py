"""After-the-fact erasure work, safe to repeat: wiping forgotten samples' bytes, purging
weights that still hold erased data, and clearing the files a crash left behind (staging
files, and weights whose publish never committed)."""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from app.datasets import service as datasets
from app.models_registry import service as registry
from app.models_registry.models import Model
from unlearning.data.store import StoreError, wipe_samples
from worker.context import WorkerContext

log = logging.getLogger(__name__)

STAGING_MAX_AGE = 3600.0  # seconds; a staged file older than this belongs to a dead attempt


def wipe_forgotten(ctx: WorkerContext) -> int:
    """Zero the bytes of tombstoned samples in the stores Lethe manages."""
    wiped = 0
    with ctx.session() as db_session:
        for dataset, samples in datasets.forgotten_unwiped(db_session):
            root = ctx.settings.resolved_dataset_dir / dataset.store
            try:
                wiped += wipe_samples(root, [s.locator for s in samples])
            except StoreError as error:
                # Not a store Lethe holds (the files live elsewhere): nothing here to wipe.
                log.warning("dataset %s: cannot wipe in %s: %s", dataset.name, root, error)
            datasets.mark_wiped(db_session, dataset=dataset, sample_ids=[s.id for s in samples])
    return wiped


def purge_versions(ctx: WorkerContext) -> int:
    """Delete the weights of versions that predate a completed erasure (after the policy's
    grace period) and of rejected candidates."""
    purged = 0
    with ctx.session() as db_session:
        for model in db_session.scalars(select(Model)).all():
            for version in registry.purgeable_versions(db_session, model=model):
                if version.artifact_uri:
                    ctx.artifacts.delete(version.artifact_uri)
                registry.mark_purged(db_session, model=model, version=version)
                purged += 1
    return purged


def clear_staging(ctx: WorkerContext) -> int:
    staging = ctx.artifacts.staging
    if not staging.is_dir():
        return 0
    cutoff = time.time() - STAGING_MAX_AGE
    removed = 0
    for path in staging.iterdir():
        if path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def clear_orphans(ctx: WorkerContext) -> int:
    """Delete weights under a final name that no version row names. A publish moves the file
    in before its transaction commits (so no row ever points at a missing file); a worker
    killed in between leaves the file without a row, and the retry writes its own: the orphan
    is a model computed from data that may since have been erased, and no purge would ever
    find it. Only files older than STAGING_MAX_AGE go: a younger one may be a publish's that
    is still committing."""
    root = ctx.artifacts.root
    if not root.is_dir():
        return 0
    with ctx.session() as db_session:
        named = registry.artifact_uris(db_session)
    cutoff = time.time() - STAGING_MAX_AGE
    removed = 0
    for path in root.rglob("*.safetensors"):
        relative = path.relative_to(root)
        if (relative.parts[0] == ctx.artifacts.staging.name or relative.as_posix() in named
                or not path.is_file() or path.stat().st_mtime >= cutoff):
            continue
        log.warning("deleting %s: weights no version names (a publish that never committed)",
                    relative)
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def run_all(ctx: WorkerContext) -> dict[str, int]:
    return {"wiped": wipe_forgotten(ctx), "purged": purge_versions(ctx),
            "staging_cleared": clear_staging(ctx), "orphans_cleared": clear_orphans(ctx)}
