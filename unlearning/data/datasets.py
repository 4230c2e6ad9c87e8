"""Fetching and loading the real datasets the engine is exercised on.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (no root needed: the .deb
is downloaded, its sha256 checked, and its IDX files extracted in pure Python), or from
torchvision's ``FashionMNIST/raw`` layout when that is already on disk. scikit-learn's digits
ship inside the wheel. Images are kept as uint8 ``[N, C, H, W]`` tensors; models see ``x/255``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearning.atomic import atomic_write

log = logging.getLogger(__name__)

FASHION_MNIST_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_DEB_URL = (
    "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
    f"dataset-fashion-mnist_{FASHION_MNIST_DEB_VERSION}_all.deb"
)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DATASET_NAMES = ("fashion-mnist", "digits")


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and could not be fetched."""


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 ``[N, C, H, W]`` and int64 labels, with the publisher's train/test flag
    (``official_test`` is all False when the dataset has no official split)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    official_test: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return int(channels), int(height), int(width)

    def reshaped(self, channels: int, height: int, width: int) -> ImageDataset:
        """The same images zero-padded (centred) to ``height`` x ``width`` and, when they have
        one channel, repeated to ``channels``: how greyscale 28x28 images are fed to models
        built for 3x32x32 (CIFAR-shaped) inputs. Labels and splits are unchanged."""
        have_c, have_h, have_w = self.input_shape
        if height < have_h or width < have_w:
            raise ValueError(f"cannot pad {have_h}x{have_w} images down to {height}x{width}")
        if channels != have_c and have_c != 1:
            raise ValueError(f"cannot turn {have_c}-channel images into {channels} channels")
        top, left = (height - have_h) // 2, (width - have_w) // 2
        images = F.pad(self.images, (left, width - have_w - left, top, height - have_h - top))
        if channels != have_c:
            images = images.expand(-1, channels, -1, -1).contiguous()
        return replace(self, images=images)


def dataset_dir(data_dir: str | os.PathLike[str], name: str) -> Path:
    """Where a fetched dataset lives: ``<data dir>/datasets/<name>/``."""
    return Path(data_dir).expanduser() / "datasets" / name


# -- Fashion-MNIST -------------------------------------------------------------------------


def _torchvision_raw_dir(directory: Path) -> Path | None:
    raw = directory / "FashionMNIST" / "raw"
    names = [f.removesuffix(".gz") for f in FASHION_MNIST_FILES]
    if all((raw / f).exists() or (raw / n).exists() for f, n in zip(FASHION_MNIST_FILES, names,
                                                                     strict=True)):
        return raw
    return None


def _has_idx_files(directory: Path) -> bool:
    return all((directory / f).exists() for f in FASHION_MNIST_FILES)


def fetch_fashion_mnist(data_dir: str | os.PathLike[str]) -> Path:
    """Make Fashion-MNIST's four IDX files available under ``<data dir>/datasets/fashion-mnist``
    and return that directory. Nothing is downloaded when they (or torchvision's raw layout)
    are already there."""
    target = dataset_dir(data_dir, "fashion-mnist")
    if _has_idx_files(target) or _torchvision_raw_dir(target) is not None:
        return target
    with tempfile.TemporaryDirectory(prefix="lethe-fetch-") as scratch:
        deb = _download_deb(Path(scratch))
        staging = Path(scratch) / "files"
        _extract_idx_from_deb(deb, staging)
        for name in FASHION_MNIST_FILES:
            with atomic_write(target / name) as partial:  # a crash never leaves half a file
                shutil.copyfile(staging / name, partial)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_deb(scratch: Path) -> Path:
    """apt-get download first (uses the machine's mirrors and proxy), then plain HTTP from the
    Debian pool; either way the bytes must match the pinned sha256."""
    attempts: list[str] = []
    apt = shutil.which("apt-get")
    if apt is not None:
        result = subprocess.run(
            [apt, "download", f"dataset-fashion-mnist={FASHION_MNIST_DEB_VERSION}"],
            cwd=scratch, capture_output=True, text=True, timeout=600, check=False,
        )
        debs = sorted(scratch.glob("dataset-fashion-mnist_*.deb"))
        if result.returncode == 0 and debs:
            if _sha256(debs[0]) == FASHION_MNIST_DEB_SHA256:
                return debs[0]
            attempts.append("apt-get download: sha256 mismatch")
        else:
            attempts.append(f"apt-get download: {result.stderr.strip()[-200:]}")
    deb = scratch / "dataset-fashion-mnist.deb"
    try:
        with urllib.request.urlopen(FASHION_MNIST_DEB_URL, timeout=120) as response, \
                deb.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        attempts.append(f"HTTP {FASHION_MNIST_DEB_URL}: {error}")
        raise DatasetUnavailable("could not fetch Fashion-MNIST: " + "; ".join(attempts)) from error
    if _sha256(deb) != FASHION_MNIST_DEB_SHA256:
        attempts.append("HTTP: sha256 mismatch")
        raise DatasetUnavailable("could not fetch Fashion-MNIST: " + "; ".join(attempts))
    return deb


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container format of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise DatasetUnavailable("not an ar archive")
    members: dict[str, bytes] = {}
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[offset + 60:offset + 60 + size]
        offset += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def _extract_idx_from_deb(deb: Path, out_dir: Path) -> None:
    """Pure-Python ``dpkg -x`` restricted to the four IDX files: no dpkg, no root."""
    members = _ar_members(deb.read_bytes())
    payload_name = next((n for n in members if n.startswith("data.tar")), None)
    if payload_name is None:
        raise DatasetUnavailable(f"{deb.name} holds no data.tar")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(FASHION_MNIST_FILES)
    with tarfile.open(fileobj=io.BytesIO(members[payload_name]), mode="r:*") as archive:
        for member in archive.getmembers():
            base = Path(member.name).name
            if member.isfile() and base in wanted and "fashion-mnist" in member.name:
                source = archive.extractfile(member)
                assert source is not None
                (out_dir / base).write_bytes(source.read())
                wanted.discard(base)
    if wanted:
        raise DatasetUnavailable(f"{deb.name} lacks {sorted(wanted)}")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): big-endian magic, dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: str | os.PathLike[str], *, fetch: bool = True) -> ImageDataset:
    """All 70 000 Fashion-MNIST images, the 60 000 official training images first."""
    directory = dataset_dir(data_dir, "fashion-mnist")
    if fetch:
        fetch_fashion_mnist(data_dir)
    raw = _torchvision_raw_dir(directory)
    if _has_idx_files(directory):
        paths = [directory / f for f in FASHION_MNIST_FILES]
    elif raw is not None:
        paths = [raw / f if (raw / f).exists() else raw / f.removesuffix(".gz")
                 for f in FASHION_MNIST_FILES]
    else:
        raise DatasetUnavailable(f"Fashion-MNIST not found under {directory}; run "
                                 "`lethe data fetch fashion-mnist`")
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in paths)
    images = torch.from_numpy(np.concatenate([train_x, test_x])).unsqueeze(1).contiguous()
    labels = torch.from_numpy(np.concatenate([train_y, test_y]).astype(np.int64))
    official_test = torch.zeros(len(labels), dtype=torch.bool)
    official_test[len(train_y):] = True
    return ImageDataset("fashion-mnist", images, labels, official_test, FASHION_MNIST_CLASSES)


# -- scikit-learn digits -------------------------------------------------------------------


def load_digits() -> ImageDataset:
    """scikit-learn's 1 797 8x8 digits, rescaled from 0..16 to uint8 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageDataset("digits", images, labels, torch.zeros(len(labels), dtype=torch.bool),
                        tuple(str(d) for d in range(10)))


def load_dataset(name: str, data_dir: str | os.PathLike[str]) -> ImageDataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASET_NAMES}")
