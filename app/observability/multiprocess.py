"""Setting up prometheus-client's multiprocess mode before uvicorn starts its workers.

Kept apart from metrics.py on purpose: prometheus-client picks its value store when it is
first imported, so this must run (in the parent) before anything imports it."""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(path: Path) -> Path:
    """An empty directory (files an earlier run left would add to this run's counts), named in
    the environment the worker processes inherit."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def metrics_dir_for(workers: int, data_dir: Path) -> Path | None:
    """Where several processes share metrics: the operator's PROMETHEUS_MULTIPROC_DIR, else
    a folder in the data dir when there is more than one worker; None for one process."""
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        return Path(configured)
    return data_dir / "prometheus" if workers > 1 else None
