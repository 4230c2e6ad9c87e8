"""The sample store: where training samples live, addressed by locator strings.

Two layouts under one store root:

* safetensors shards holding ``x`` (uint8 images), ``y`` (int64 labels) and the sample keys (a
  JSON list in the header metadata); a locator is ``"<shard relative path>#<row>"``;
* an image folder: a locator is the image's relative path (PNG or any format Pillow reads).

Locators are resolved under the root only: absolute paths, ``..`` and symlinks that leave the
root are refused with :class:`UnsafeLocator`. Shards are read through a memory map of the
tensor bytes (the header is parsed here; nothing is unpickled or executed), so loading a forget
set of a few rows does not read whole shards. Wiping zeroes a sample's bytes and rewrites the
shard atomically, so erased data is gone from the file, not merely unlisted.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from unlearning.atomic import atomic_write

SHARD_SUFFIX = ".safetensors"
_NUMPY_DTYPES = {
    "U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BOOL": np.bool_,
}


class StoreError(ValueError):
    """A locator or shard the store cannot serve."""


class UnsafeLocator(StoreError):
    """A locator that would escape the store root (absolute path, ``..``, outside symlink)."""


class SampleErased(StoreError):
    """The locator points at a row that was wiped."""


@dataclass(frozen=True)
class Samples:
    """Tensors for a list of locators, in the order asked for."""

    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    keys: list[str]


@dataclass(frozen=True)
class Locator:
    path: Path
    row: int | None  # None for an image file


def resolve_locator(root: str | os.PathLike[str], locator: str) -> Locator:
    """Turn ``"shards/part-0000.safetensors#17"`` or ``"images/a.png"`` into a path under
    ``root``, refusing anything that could read outside it."""
    if not locator or "\x00" in locator or "\\" in locator:
        raise UnsafeLocator(f"malformed locator {locator!r}")
    relative, _, row_text = locator.partition("#")
    parts = PurePosixPath(relative)
    if parts.is_absolute() or relative.startswith("~"):
        raise UnsafeLocator(f"absolute locator refused: {locator!r}")
    if any(part in ("..", "") for part in relative.split("/")):
        raise UnsafeLocator(f"locator may not contain '..' or empty segments: {locator!r}")
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise UnsafeLocator(f"locator resolves outside the store: {locator!r}")
    row: int | None = None
    if row_text:
        if not row_text.isdigit():
            raise StoreError(f"row must be a non-negative integer: {locator!r}")
        row = int(row_text)
    elif relative.endswith(SHARD_SUFFIX):
        raise StoreError(f"shard locator needs '#<row>': {locator!r}")
    return Locator(path, row)


# -- shards ---------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike[str], x: torch.Tensor, y: torch.Tensor,
                keys: Sequence[str], *, wiped_rows: Iterable[int] = ()) -> Path:
    """Write a shard atomically (:func:`unlearning.atomic.atomic_write`)."""
    target = Path(path)
    if x.dtype != torch.uint8:
        raise StoreError("shards hold uint8 images")
    if not (len(x) == len(y) == len(keys)):
        raise StoreError(f"x, y and keys differ in length: {len(x)}, {len(y)}, {len(keys)}")
    metadata = {"keys": json.dumps(list(keys)), "wiped_rows": json.dumps(sorted(wiped_rows))}
    with atomic_write(target) as temp:
        save_file({"x": x.contiguous(), "y": y.to(torch.int64).contiguous()}, str(temp),
                  metadata=metadata)
    return target


class ShardReader:
    """Memory-mapped view of one shard's tensors; parses the safetensors header itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            header_len, header, metadata = self._header(path)
            # parsed when first asked for: a shard's keys can be megabytes of strings, and a
            # manifest check opens many shards without needing them
            self._keys_json = metadata.get("keys", "[]")
            if not isinstance(self._keys_json, str):
                raise StoreError(f"{path.name}: malformed `keys` metadata")
            self.wiped_rows: set[int] = set(json.loads(metadata.get("wiped_rows", "[]")))
            if not all(isinstance(r, int) for r in self.wiped_rows):
                raise StoreError(f"{path.name}: malformed `wiped_rows` metadata")
            self.arrays: dict[str, np.ndarray] = {}
            for name, info in header.items():
                self.arrays[name] = self._map(path, name, info, 8 + header_len)
        except StoreError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError,
                OverflowError, struct.error) as exc:  # a header built to break the parser
            raise StoreError(f"{path.name}: not a readable safetensors file "
                             f"({type(exc).__name__}: {exc})") from None
        if "x" not in self.arrays or "y" not in self.arrays:
            raise StoreError(f"{path.name}: a shard holds tensors 'x' and 'y'")

    @staticmethod
    def _header(path: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > 100 * 2**20:
                raise StoreError(f"{path.name}: implausible header size")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise StoreError(f"{path.name}: the header is not a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict):
            raise StoreError(f"{path.name}: `__metadata__` is not a JSON object")
        return header_len, header, metadata

    @staticmethod
    def _map(path: Path, name: str, info: Any, data_start: int) -> np.ndarray:
        """One tensor of the header (``info``: JSON as the file holds it, checked here)."""
        dtype = _NUMPY_DTYPES.get(str(info["dtype"]))
        if dtype is None:
            raise StoreError(f"{path.name}: unsupported dtype {info['dtype']}")
        start, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        if any(d < 0 for d in shape) or not 0 <= start <= end:
            raise StoreError(f"{path.name}: tensor {name} has a negative shape or offset")
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise StoreError(f"{path.name}: tensor {name} size does not match its shape")
        if data_start + end > path.stat().st_size:
            raise StoreError(f"{path.name}: tensor {name} lies past the end of the file")
        if end == start:
            return np.zeros(shape, dtype=dtype)
        mapped: np.ndarray = np.memmap(path, dtype=dtype, mode="r", offset=data_start + start,
                                       shape=shape)
        return mapped

    @functools.cached_property
    def keys(self) -> list[str]:
        """The rows' sample keys (StoreError when the metadata is not a JSON list)."""
        try:
            keys = json.loads(self._keys_json)
        except (ValueError, RecursionError):
            keys = None
        if not isinstance(keys, list):
            raise StoreError(f"{self.path.name}: `keys` metadata is not a JSON list")
        return keys

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of each row; StoreError unless ``x`` is [N, C, H, W]."""
        shape = self.arrays["x"].shape
        if len(shape) != 4:
            raise StoreError(f"{self.path.name}: `x` must be shaped [N, C, H, W], not "
                             f"{list(shape)}")
        return int(shape[1]), int(shape[2]), int(shape[3])

    def label(self, row: int) -> int:
        return int(self.arrays["y"][row])

    def __len__(self) -> int:
        return int(self.arrays["y"].shape[0])

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of every row (wiped ones included, as zeros)."""
        return np.array(self.arrays["x"]), np.array(self.arrays["y"])

    def rows(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(rows, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise StoreError(f"{self.path.name}: row out of range (shard has {len(self)})")
        erased = self.wiped_rows.intersection(index.tolist())
        if erased:
            raise SampleErased(f"{self.path.name}: rows {sorted(erased)[:5]} were wiped")
        return np.array(self.arrays["x"][index]), np.array(self.arrays["y"][index])


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L") if image.mode in ("L", "1", "P", "I;16")
                            else image.convert("RGB"), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_samples(root: str | os.PathLike[str], locators: Sequence[str],
                 labels: Sequence[int] | None = None) -> Samples:
    """Load the samples behind ``locators`` (grouped by shard, each shard opened once).

    Image-folder samples carry no label in the file: pass ``labels`` (from the manifest) for
    them; for shard rows the shard's own ``y`` is used unless ``labels`` overrides it."""
    resolved = [resolve_locator(root, loc) for loc in locators]
    by_shard: dict[Path, list[int]] = defaultdict(list)
    for position, loc in enumerate(resolved):
        if loc.row is not None:
            by_shard[loc.path].append(position)
    xs: list[np.ndarray | None] = [None] * len(resolved)
    ys = np.full(len(resolved), -1, dtype=np.int64)
    keys = [""] * len(resolved)
    for shard_path, positions in by_shard.items():
        if not shard_path.is_file():
            raise StoreError(f"no shard at {shard_path.name}")
        reader = ShardReader(shard_path)
        rows = [resolved[p].row for p in positions]
        x, y = reader.rows(rows)  # type: ignore[arg-type]
        for i, position in enumerate(positions):
            xs[position] = x[i]
            ys[position] = y[i]
            row = rows[i]
            keys[position] = reader.keys[row] if row is not None and row < len(reader.keys) \
                else ""
    for position, loc in enumerate(resolved):
        if loc.row is None:
            if not loc.path.is_file():
                raise StoreError(f"no image at {locators[position]!r}")
            xs[position] = _read_image(loc.path)
            keys[position] = locators[position]
    if labels is not None:
        ys = np.asarray(labels, dtype=np.int64)
    if (ys < 0).any():
        raise StoreError("image-folder samples need labels from the manifest")
    shapes = {a.shape for a in xs if a is not None}
    if len(shapes) > 1:
        raise StoreError(f"samples differ in shape: {sorted(shapes)}")
    x_all = torch.from_numpy(np.stack(xs)) if xs else torch.empty(0, dtype=torch.uint8)  # type: ignore[arg-type]
    return Samples(x_all, torch.from_numpy(ys), keys)


def wipe_samples(root: str | os.PathLike[str], locators: Iterable[str]) -> int:
    """Erase the bytes of the given samples; return how many were wiped.

    Shard rows: image bytes and label zeroed, key blanked, row listed as wiped, shard rewritten
    atomically (so a crash leaves the old or the new file, never half of one). Image files:
    overwritten with zeros, flushed, then unlinked. The filesystem may still hold the old
    blocks until they are reused; storage-level erasure is the deployment's concern."""
    by_shard: dict[Path, set[int]] = defaultdict(set)
    images: list[Path] = []
    for locator in locators:
        loc = resolve_locator(root, locator)
        if loc.row is None:
            images.append(loc.path)
        else:
            by_shard[loc.path].add(loc.row)
    wiped = 0
    for shard_path, rows in by_shard.items():
        reader = ShardReader(shard_path)
        if max(rows) >= len(reader):
            raise StoreError(f"{shard_path.name}: row out of range")
        x, y = (torch.from_numpy(a) for a in reader.all_rows())
        keys = list(reader.keys)
        previously_wiped = reader.wiped_rows
        index = torch.tensor(sorted(rows))
        x[index] = 0
        y[index] = 0
        for row in rows:
            if row < len(keys):
                keys[row] = ""
        del reader  # drop the memory map before the file is replaced
        write_shard(shard_path, x, y, keys, wiped_rows=rows | previously_wiped)
        wiped += len(rows - previously_wiped)
    for image in images:
        if image.is_file():
            size = image.stat().st_size
            with image.open("r+b") as handle:
                handle.write(b"\x00" * size)
                handle.flush()
                os.fsync(handle.fileno())
            image.unlink()
            wiped += 1
    return wiped
