"""The sample store: locators stay inside the store, loads follow locator order, wipes really
erase bytes, and the demo catalogue gives every sample a split and a pseudonymous subject."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unlearning.data.catalog import SplitSpec, iter_manifest, write_dataset_store
from unlearning.data.datasets import load_digits
from unlearning.data.store import (
    SampleErased,
    StoreError,
    UnsafeLocator,
    load_samples,
    resolve_locator,
    wipe_samples,
    write_shard,
)


def _shard(root: Path, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    # distinctive bytes per row, so a wipe can be checked in the raw file
    x = torch.stack([torch.full((1, 4, 4), 17 + 31 * i, dtype=torch.uint8) for i in range(n)])
    y = torch.arange(n) % 3
    keys = [f"sample-{i}" for i in range(n)]
    write_shard(root / "shards" / "part-0000.safetensors", x, y, keys)
    return x, y, keys


@pytest.mark.parametrize("locator", [
    "/etc/passwd", "../outside.safetensors#0", "shards/../../outside.safetensors#0",
    "shards//part-0000.safetensors#0", "~/x.png", "shards\\part.safetensors#0", "",
])
def test_locators_that_leave_the_store_are_refused(tmp_path: Path, locator: str) -> None:
    with pytest.raises(UnsafeLocator):
        resolve_locator(tmp_path, locator)


def test_a_symlink_pointing_outside_the_store_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"not yours")
    store = tmp_path / "store"
    store.mkdir()
    (store / "link").symlink_to(outside)
    with pytest.raises(UnsafeLocator):
        load_samples(store, ["link/secret.png"], labels=[0])


def test_shard_rows_load_in_locator_order_with_keys_and_labels(tmp_path: Path) -> None:
    x, y, keys = _shard(tmp_path)
    locators = [f"shards/part-0000.safetensors#{row}" for row in (4, 0, 2)]
    samples = load_samples(tmp_path, locators)
    assert torch.equal(samples.x, x[[4, 0, 2]])
    assert samples.y.tolist() == y[[4, 0, 2]].tolist()
    assert samples.keys == ["sample-4", "sample-0", "sample-2"]


def test_a_row_past_the_end_of_a_shard_is_an_error(tmp_path: Path) -> None:
    _shard(tmp_path, n=3)
    with pytest.raises(StoreError, match="out of range"):
        load_samples(tmp_path, ["shards/part-0000.safetensors#3"])


def test_wipe_zeroes_the_bytes_of_forgotten_rows_only(tmp_path: Path) -> None:
    x, _, _ = _shard(tmp_path)
    shard = tmp_path / "shards" / "part-0000.safetensors"
    forgotten_pattern = bytes([17 + 31 * 3]) * 16
    assert forgotten_pattern in shard.read_bytes()

    assert wipe_samples(tmp_path, ["shards/part-0000.safetensors#3"]) == 1

    raw = shard.read_bytes()
    assert forgotten_pattern not in raw
    assert b"sample-3" not in raw  # the key is gone from the header too
    with pytest.raises(SampleErased):
        load_samples(tmp_path, ["shards/part-0000.safetensors#3"])
    kept = load_samples(tmp_path, [f"shards/part-0000.safetensors#{r}" for r in (2, 4)])
    assert torch.equal(kept.x, x[[2, 4]])
    assert not list(shard.parent.glob(".*"))  # no temp file left behind
    # wiping again is idempotent and counts nothing new
    assert wipe_samples(tmp_path, ["shards/part-0000.safetensors#3"]) == 0


def test_image_folder_samples_load_with_manifest_labels_and_wipe_deletes_them(
        tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
    samples = load_samples(tmp_path, ["images/a.png"], labels=[7])
    assert samples.x.shape == (1, 1, 8, 8)
    assert torch.equal(samples.x[0, 0], torch.from_numpy(pixels))
    assert samples.y.tolist() == [7]
    assert wipe_samples(tmp_path, ["images/a.png"]) == 1
    assert not (tmp_path / "images" / "a.png").exists()


def test_catalogue_assigns_splits_and_subjects_that_own_several_samples(tmp_path: Path) -> None:
    digits = load_digits()
    write_dataset_store(digits, tmp_path, split_spec=SplitSpec(holdout_fraction=0.2, seed=3),
                        samples_per_subject=4, shard_size=500)
    rows = list(iter_manifest(tmp_path))
    assert len(rows) == len(digits)
    assert set(rows[0]) == {"sample_key", "subject_ref", "label", "split", "locator"}
    splits = [r["split"] for r in rows]
    assert {s: splits.count(s) > 0 for s in ("train", "holdout", "test")} == \
        {"train": True, "holdout": True, "test": True}
    owners: dict[str, int] = {}
    for row in rows:
        ref = row["subject_ref"]
        assert isinstance(ref, str), row
        owners[ref] = owners.get(ref, 0) + 1
    assert max(owners.values()) == 4 and len(owners) == -(-len(digits) // 4)
    assert all(ref.startswith("subject-") for ref in owners)
    # locators resolve back to the very images and labels of the dataset
    picked = rows[:3] + rows[-2:]
    samples = load_samples(tmp_path, [str(r["locator"]) for r in picked])
    index = [int(str(r["sample_key"]).rsplit("-", 1)[1]) for r in picked]
    assert torch.equal(samples.x, digits.images[index])
    assert samples.y.tolist() == [r["label"] for r in picked]
    # same seed, same catalogue
    again = tmp_path / "again"
    write_dataset_store(digits, again, split_spec=SplitSpec(holdout_fraction=0.2, seed=3),
                        samples_per_subject=4, shard_size=500)
    assert json.dumps(list(iter_manifest(again))) == json.dumps(rows)
