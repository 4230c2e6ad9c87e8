"""What the unlearning pipeline and the reference job both need: loading a list of samples as
tensors, and a heartbeat thread that keeps a long computation from looking like a lost worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from app.datasets.models import Sample
from unlearning.data.store import StoreError, load_samples
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
    worker. A failed beat is logged and retried at the next tick; what a beat returns (a
    fenced job beat says whether it still owns the job) is left to the work's own writes."""

    def __init__(self, ctx: WorkerContext, name: str, beat: Callable[[Session], object], *,
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


@dataclass(frozen=True)
class Readable:
    """What could be read of a list of samples: the tensors of those that loaded, in order,
    and why each of the others could not (a shard or image lost or damaged on disk after it
    was registered)."""

    samples: SampleSet
    kept: list[Sample]
    broken: dict[int, str]  # sample id -> the store's reason


def load_readable(root: Path, samples: list[Sample]) -> Readable:
    """Like ``load_tensors``, but a sample the store cannot serve is set aside with its reason
    instead of failing the whole load; the caller decides who needed it. The common case (all
    readable) costs one load; otherwise each file is tried alone, then each sample of a file
    that failed."""
    try:
        return Readable(load_tensors(root, samples), samples, {})
    except StoreError:
        pass
    by_file: dict[str, list[Sample]] = {}
    for sample in samples:
        by_file.setdefault(sample.locator.partition("#")[0], []).append(sample)
    broken: dict[int, str] = {}
    for group in by_file.values():
        try:
            load_tensors(root, group)
        except StoreError:
            for sample in group:
                try:
                    load_tensors(root, [sample])
                except StoreError as exc:
                    broken[sample.id] = str(exc)
    kept = [s for s in samples if s.id not in broken]
    return Readable(load_tensors(root, kept), kept, broken)
