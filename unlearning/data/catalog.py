"""Demo catalogue: a dataset written as a sample store with a manifest of samples, each with a
seeded split and a pseudonymous subject, so subject-level deletion requests are meaningful.

Manifest rows (``manifest.jsonl`` beside the shards) are dicts
``{sample_key, subject_ref, label, split, locator}`` that the control plane imports as its
Sample registry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unlearning.atomic import atomic_write
from unlearning.data.datasets import ImageDataset
from unlearning.data.store import write_shard

MANIFEST_NAME = "manifest.jsonl"
SPLITS = ("train", "holdout", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of the non-test data kept as holdout (never trained on; a job halves it into
    its ``unseen`` and ``audit`` slices) and, for datasets without an official test split, the
    fraction used as test."""

    holdout_fraction: float = 0.1
    test_fraction: float = 0.15
    seed: int = 0


def assign_splits(dataset: ImageDataset, spec: SplitSpec) -> np.ndarray:
    """Per-sample split name. The publisher's test split is kept as test when there is one;
    the rest is shuffled with ``spec.seed`` and cut into holdout and train."""
    rng = np.random.default_rng(spec.seed)
    n = len(dataset)
    splits = np.full(n, "train", dtype=object)
    official = dataset.official_test.numpy()
    if official.any():
        splits[official] = "test"
        pool = np.flatnonzero(~official)
    else:
        order = rng.permutation(n)
        n_test = int(round(spec.test_fraction * n))
        splits[order[:n_test]] = "test"
        pool = order[n_test:]
    pool = rng.permutation(pool)
    splits[pool[: int(round(spec.holdout_fraction * len(pool)))]] = "holdout"
    return splits


def assign_subjects(n: int, samples_per_subject: int, seed: int) -> list[str]:
    """Pseudonymous owners: each ``subject-NNNNNN`` owns ``samples_per_subject`` random
    samples (the last one possibly fewer)."""
    if samples_per_subject < 1:
        raise ValueError("samples_per_subject must be at least 1")
    order = np.random.default_rng(seed + 1).permutation(n)
    owners = [""] * n
    for position, index in enumerate(order):
        owners[index] = f"subject-{position // samples_per_subject:06d}"
    return owners


def write_dataset_store(dataset: ImageDataset, root: str | os.PathLike[str], *,
                        split_spec: SplitSpec | None = None, samples_per_subject: int = 5,
                        shard_size: int = 10_000) -> Path:
    """Write ``dataset`` as shards under ``root/shards/`` plus ``root/manifest.jsonl``;
    returns the manifest path. Rewriting is idempotent for the same arguments."""
    spec = split_spec or SplitSpec()
    root_path = Path(root)
    splits = assign_splits(dataset, spec)
    subjects = assign_subjects(len(dataset), samples_per_subject, spec.seed)
    keys = [f"{dataset.name}-{i:06d}" for i in range(len(dataset))]
    rows: list[dict[str, object]] = []
    for shard_index, start in enumerate(range(0, len(dataset), shard_size)):
        stop = min(start + shard_size, len(dataset))
        relative = f"shards/part-{shard_index:04d}.safetensors"
        write_shard(root_path / relative, dataset.images[start:stop],
                    dataset.labels[start:stop], keys[start:stop])
        for i in range(start, stop):
            rows.append({"sample_key": keys[i], "subject_ref": subjects[i],
                         "label": int(dataset.labels[i]), "split": str(splits[i]),
                         "locator": f"{relative}#{i - start}"})
    manifest = root_path / MANIFEST_NAME
    with atomic_write(manifest) as partial, partial.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return manifest


def iter_manifest(root: str | os.PathLike[str]) -> Iterator[dict[str, object]]:
    """The manifest rows of a store written by :func:`write_dataset_store` (or by hand, for an
    image folder: same keys, locators being relative image paths)."""
    with (Path(root) / MANIFEST_NAME).open() as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)

