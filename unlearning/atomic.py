"""Files written so that a crash leaves the old file or the new one under the final name, never
half of one: written under a temporary name in the same folder, fsynced, renamed (or linked)
into place, and the folder fsynced so the new name itself survives a crash."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(target: str | os.PathLike[str], *, mode: int = 0o644,
                 replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for the caller to write; when the block ends
    without an error, the file is fsynced and moved to ``target``. With ``replace=False`` an
    existing ``target`` is never overwritten: FileExistsError instead. On any error the
    temporary file is removed and ``target`` is untouched."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.fchmod(fd, mode)  # mkstemp's 0600 would hide a weights file from a serving process
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, final)
        else:
            # link() fails when the name exists: of two writers racing, exactly one wins.
            os.link(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(final.parent)
