"""The weights store: a folder of safetensors files, written so that a crash never leaves a
half-written artifact under a final name (temp file, fsync, rename, fsync the folder)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from unlearning.atomic import fsync_dir

CHUNK = 1 << 20


@dataclass(frozen=True)
class StagedArtifact:
    path: Path
    sha256: str
    size_bytes: int


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / ".staging"

    def path_of(self, uri: str) -> Path:
        path = (self.root / uri).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact uri {uri!r} escapes the store")
        return path

    def new_staging_path(self) -> Path:
        """A fresh name in the store's staging folder (same file system as the final names)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{secrets.token_hex(8)}.partial"

    def stage_file(self, path: Path) -> StagedArtifact:
        """Describe a file already written (and fsynced) under a staging name."""
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return StagedArtifact(path=path, sha256=digest.hexdigest(), size_bytes=size)

    async def stage_stream(self, chunks: AsyncIterator[bytes]) -> StagedArtifact:
        """Spool an upload to disk while hashing it; nothing but one chunk sits in memory."""
        path = self.new_staging_path()
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as handle:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return StagedArtifact(path=path, sha256=digest.hexdigest(), size_bytes=size)

    def commit(self, staged: StagedArtifact, *, uri: str) -> Path:
        """Move a staged file to its final name atomically and durably."""
        final = self.path_of(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, final)
        fsync_dir(final.parent)
        return final

    def discard(self, staged: StagedArtifact) -> None:
        staged.path.unlink(missing_ok=True)

    def delete(self, uri: str) -> None:
        self.path_of(uri).unlink(missing_ok=True)

    def sha256_of(self, uri: str) -> str:
        return self.stage_file(self.path_of(uri)).sha256


def version_uri(model_name: str, number: int, sha256: str) -> str:
    return f"{model_name}/v{number}-{sha256[:12]}.safetensors"
