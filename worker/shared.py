"""What the unlearning pipeline and the reference job both need: loading a list of samples as
tensors, and a heartbeat thread that keeps a long computation from looking like a lost worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from app.datasets.models import Sample
from unlearning.data.store import load_samples
from unlearning.loops import SampleSet
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def load_tensors(root: Path, samples: list[Sample]) -> SampleSet:
    """The images and labels of ``samples``, in order."""
    if not samples:
        return SampleSet(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    loaded = load_samples(root, [s.locator for s in samples], labels=[s.label for s in samples])
    return SampleSet(loaded.x, loaded.y)


class Heartbeat:
    """Calls ``beat`` in a fresh session every ``every`` seconds from a thread while the
    worker computes, so a long step without progress callbacks is not mistaken for a lost
    worker. A failed beat is logged and retried at the next tick."""

    def __init__(self, ctx: WorkerContext, name: str, beat: Callable[[Session], None], *,
                 every: float) -> None:
        self.ctx, self.name, self.beat, self.every = ctx, name, beat, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.ctx.session() as db_session:
                    self.beat(db_session)
            except Exception:  # the work itself decides its fate
                log.warning("heartbeat for %s failed", self.name, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
