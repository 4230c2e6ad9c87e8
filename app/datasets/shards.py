"""What a dataset's sample store must hold, checked when it arrives rather than inside a job.

A dataset's samples all share one shape, ``(channels, height, width)`` of uint8 pixels: the
first sample registered fixes it, and every later shard, manifest row and model registered on
the dataset must agree. A manifest row that names a shard row is checked against the shard
itself: the shard exists, the row is in range and not wiped, the label the manifest gives is
the label the shard holds, and it is one of the classes of every model trained on the dataset.
Shards arrive over HTTP (``PUT /v1/datasets/{name}/shards/{path}``): streamed to a temporary
file beside their final place, checked, and only then linked into place, so a half-written or
malformed shard is never visible to a job.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, PayloadTooLarge, Unprocessable
from app.datasets.models import Dataset, ManifestRow, Sample, ShardRead
from app.datasets.service import check_relative_path
from unlearning.atomic import atomic_write
from unlearning.data.store import (
    SHARD_SUFFIX,
    ShardReader,
    StoreError,
    resolve_locator,
)

Shape = tuple[int, int, int]
# Open shards a manifest check keeps at once (each is a header and two memory maps).
OPEN_SHARDS = 16


def dataset_root(dataset_dir: Path, dataset: Dataset) -> Path:
    return dataset_dir / dataset.store


def _shape_text(shape: Shape | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _image_shape(path: Path) -> Shape:
    from PIL import Image

    with Image.open(path) as image:
        channels = 1 if image.mode in ("L", "1", "P", "I;16") else 3
        return channels, image.height, image.width


def locator_shape(root: Path, locator: str) -> Shape:
    """The ``(C, H, W)`` of the sample a locator names (a shard's header, or the image's
    header); StoreError when it cannot be read."""
    resolved = resolve_locator(root, locator)
    if resolved.row is None:
        if not resolved.path.is_file():
            raise StoreError(f"no image at {locator!r}")
        try:
            return _image_shape(resolved.path)
        except OSError as exc:
            raise StoreError(f"{locator!r} is not an image Pillow can read: {exc}") from None
    if not resolved.path.is_file():
        raise StoreError(f"no shard at {locator.partition('#')[0]!r}")
    return ShardReader(resolved.path).sample_shape


def established_shape(db_session: Session, *, dataset: Dataset, dataset_dir: Path
                      ) -> Shape | None:
    """The shape the dataset's samples have, read off its first registered sample that is
    still readable (None while the dataset has none)."""
    root = dataset_root(dataset_dir, dataset)
    candidates = db_session.scalars(select(Sample.locator).where(
        Sample.dataset_id == dataset.id, Sample.wiped_at.is_(None)).order_by(Sample.id).limit(5))
    for locator in candidates:
        try:
            return locator_shape(root, locator)
        except StoreError:
            continue  # a lost file: the next sample tells as well
    return None


def label_range(db_session: Session, *, dataset: Dataset) -> int | None:
    """The largest label among the dataset's samples, or None when it has none."""
    return db_session.scalar(select(func.max(Sample.label)).where(Sample.dataset_id == dataset.id))


# ---- the classes each model on the dataset predicts ----------------------------------------


@dataclass(frozen=True)
class ClassLimit:
    """Labels must be below ``classes``, the fewest any model on the dataset predicts."""

    classes: int
    model: str


def class_limit(db_session: Session, *, dataset: Dataset, shape: Shape | None,
                allowed_factories: list[str]) -> ClassLimit | None:
    from app.models_registry.engine_bridge import output_classes
    from app.models_registry.models import Model

    limit: ClassLimit | None = None
    for name, architecture in db_session.execute(
            select(Model.name, Model.architecture).where(Model.dataset_id == dataset.id)):
        try:
            classes = output_classes(architecture, shape, allowed_factories)
        except ValueError:
            continue  # registered before shapes were checked; its jobs will say why
        if classes is not None and (limit is None or classes < limit.classes):
            limit = ClassLimit(classes, name)
    return limit


# ---- manifests -----------------------------------------------------------------------------


class ManifestChecker:
    """Checks manifest rows against the store they point into, one row at a time (open shards
    cached), so a manifest that names a missing file, a row out of range, another shape or a
    label the shard contradicts is refused at upload, naming its line."""

    def __init__(self, root: Path, *, shape: Shape | None, limit: ClassLimit | None) -> None:
        self.root, self.shape, self.limit = root, shape, limit
        self._readers: OrderedDict[Path, ShardReader] = OrderedDict()
        self._paths: dict[str, Path] = {}

    def _reader(self, path: Path) -> ShardReader:
        reader = self._readers.pop(path, None) or ShardReader(path)
        self._readers[path] = reader
        while len(self._readers) > OPEN_SHARDS:
            self._readers.popitem(last=False)
        return reader

    def _resolve(self, locator: str) -> tuple[Path, int | None]:
        """Where a locator points (resolved once per shard: a manifest names each shard
        thousands of times)."""
        path_text, _, row_text = locator.partition("#")
        path = self._paths.get(path_text)
        if path is None:
            path = resolve_locator(self.root, locator).path
            self._paths[path_text] = path
        return path, int(row_text) if row_text else None

    def check(self, line: int, row: ManifestRow) -> None:
        def refuse(message: str) -> Unprocessable:
            return Unprocessable(f"line {line}: {message}; nothing was stored.", line=line,
                                 sample_key=row.sample_key)

        if self.limit is not None and row.label >= self.limit.classes:
            raise refuse(f"label {row.label} is not a class of model {self.limit.model!r} "
                         f"(it predicts {self.limit.classes} classes: 0 to "
                         f"{self.limit.classes - 1})")
        try:
            path, index = self._resolve(row.locator)
            if index is None:
                shape = locator_shape(self.root, row.locator)
            else:
                if not path.is_file() and path not in self._readers:
                    raise StoreError(f"no shard at {row.locator.partition('#')[0]!r}")
                reader = self._reader(path)
                shape = reader.sample_shape
                if index >= len(reader):
                    raise refuse(f"locator {row.locator!r}: row {index} is out of range "
                                 f"(the shard holds {len(reader)} rows)")
                if index in reader.wiped_rows:
                    raise refuse(f"locator {row.locator!r}: row {index} was wiped")
                held = reader.label(index)
                if held != row.label:
                    raise refuse(f"label {row.label} differs from the label the shard holds "
                                 f"for {row.locator!r} ({held})")
        except StoreError as exc:
            raise refuse(str(exc)) from None
        if self.shape is None:
            self.shape = shape  # the dataset's first sample fixes its shape
        elif shape != self.shape:
            raise refuse(f"{row.locator!r} holds a sample shaped {_shape_text(shape)}; the "
                         f"dataset's samples are {_shape_text(self.shape)}")


# ---- shard uploads -------------------------------------------------------------------------


def check_shard_path(path: str) -> None:
    try:
        check_relative_path(path, what="shard path")
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    if not path.endswith(SHARD_SUFFIX) or len(path) > 256:
        raise Unprocessable(f"shard path {path!r} must end in {SHARD_SUFFIX!r} and be at most "
                            "256 characters")


def check_shard(path: Path, *, shape: Shape | None, limit: ClassLimit | None) -> ShardReader:
    """The shard a client sent, or a 422 saying what is wrong with it: a safetensors file (the
    header parsed here, nothing executed) with ``x`` uint8 [N, C, H, W] in the dataset's
    shape, ``y`` int64 [N] within the classes of the dataset's models, and N distinct keys."""
    try:
        reader = ShardReader(path)
    except StoreError as exc:  # said of the staged file: name the shard the client sent
        reason = str(exc).removeprefix(f"{path.name}: ")
        raise Unprocessable(f"not a sample shard: {reason}") from None
    except OSError as exc:
        raise Unprocessable(f"the shard cannot be read: {exc}") from None
    x, y = reader.arrays["x"], reader.arrays["y"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise Unprocessable(f"`x` must be uint8 shaped [N, C, H, W]; got {x.dtype} "
                            f"{_shape_text(x.shape)}")
    if y.dtype != np.int64 or y.shape != (x.shape[0],):
        raise Unprocessable(f"`y` must be int64 shaped [{x.shape[0]}]; got {y.dtype} "
                            f"{_shape_text(y.shape)}")
    if x.shape[0] == 0:
        raise Unprocessable("the shard holds no rows")
    try:
        keys = reader.keys
    except StoreError:
        keys = []
    if len(keys) != x.shape[0] or len(set(map(str, keys))) != len(keys) or not all(
            isinstance(k, str) and 0 < len(k) <= 256 for k in keys):
        raise Unprocessable(f"the header metadata `keys` must be a JSON list of {x.shape[0]} "
                            "distinct, non-empty strings (at most 256 characters), one per row")
    if shape is not None and reader.sample_shape != shape:
        raise Unprocessable(f"samples shaped {_shape_text(reader.sample_shape)}; the dataset's "
                            f"samples are {_shape_text(shape)}", expected_shape=list(shape))
    if int(y.min()) < 0 or (limit is not None and int(y.max()) >= limit.classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        top = f"0 to {limit.classes - 1}, the classes of model {limit.model!r}" if limit \
            else "non-negative"
        raise Unprocessable(f"label {bad} in `y` is outside {top}")
    return reader


async def receive_shard(chunks: AsyncIterator[bytes], *, target: Path, max_bytes: int,
                        check: Callable[[Path], ShardReader]) -> ShardReader:
    """Stream a shard to a temporary file beside ``target`` (a 413 past ``max_bytes``), check
    it, and link it into place: a job never sees a partial or unchecked shard, and an existing
    shard is never replaced (its rows may be named by samples, forgotten ones included)."""
    if target.exists():
        raise Conflict(f"shard {target.name!r} already exists; shards are immutable (upload "
                       "new samples under a new name)")
    received = 0
    try:
        # replace=False: if the name appeared meanwhile, a conflict, never a replace
        with atomic_write(target, replace=False) as staging:
            with staging.open("wb") as handle:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > max_bytes:
                        raise PayloadTooLarge(f"the shard exceeds {max_bytes} bytes "
                                              "(LETHE_MAX_UPLOAD_BYTES)")
                    handle.write(chunk)
            reader = check(staging)
    except FileExistsError:
        raise Conflict(f"shard {target.name!r} already exists") from None
    reader.path = target
    return reader


def shard_read(reader: ShardReader, path: str) -> ShardRead:
    labels, counts = np.unique(np.asarray(reader.arrays["y"]), return_counts=True)
    return ShardRead(path=path, rows=len(reader), sample_shape=list(reader.sample_shape),
                     labels={str(int(k)): int(v) for k, v in zip(labels, counts, strict=True)})
