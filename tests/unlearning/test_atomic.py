"""Atomic writes: the final name holds the old file or the whole new one, never half."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearning.atomic import atomic_write


def test_a_finished_write_replaces_the_file_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "weights.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with atomic_write(target) as temp:
        assert temp.parent == target.parent
        temp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.jsonl"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as temp:
        temp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_without_replace_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "secret.key"
    with atomic_write(target, mode=0o600, replace=False) as temp:
        temp.write_text("first")
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError), atomic_write(target, replace=False) as temp:
        temp.write_text("second")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.key"]
