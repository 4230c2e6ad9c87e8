"""The documentation stands on its own in a clone: nothing cites the notes file that lived
outside the repository (docs/methods.md replaced it), and every relative link in README.md and
docs/*.md leads to a file or folder that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
# Spelled in two parts so that this file does not mention it.
OLD_NOTES = "ALGORITHMS" + ".md"
REPLACEMENT = "docs/methods.md"

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def tracked_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                                capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({type(error).__name__}): no tracked-file list")
    return [name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_the_old_notes() -> None:
    needle = OLD_NOTES.encode()
    citing = []
    for name in tracked_files():
        path = REPO / name
        if name == REPLACEMENT or not path.is_file():  # deleted in the working tree
            continue
        if needle in path.read_bytes():
            citing.append(name)
    assert not citing, (f"{OLD_NOTES} is not in the repository; cite the section of "
                        f"{REPLACEMENT} instead in: {citing}")


def relative_links(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code that is not a URL or an anchor."""
    links = []
    in_fence = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        text = INLINE_CODE.sub("", line)
        targets = INLINE_LINK.findall(text)
        reference = REFERENCE_LINK.match(text)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            if EXTERNAL.match(target) or target.startswith("#"):
                continue
            links.append((number, target))
    return links


def documentation() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", documentation(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(document: Path) -> None:
    broken = []
    for number, target in relative_links(document.read_text(encoding="utf-8")):
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (REPO / path.lstrip("/")) if path.startswith("/") else document.parent / path
        if not resolved.exists():
            broken.append(f"line {number}: {target}")
    assert not broken, f"{document.relative_to(REPO)} links to missing files: {broken}"


def test_the_link_finder_sees_what_it_should() -> None:
    sample = "\n".join([
        "[a](docs/a.md) and ![b](images/b.png \"title\") and [c](https://example.org)",
        "[d](#anchor) `[e](in-code.md)`",
        "```",
        "[f](in-fence.md)",
        "```",
        "[g]: ref/g.md",
        "[h](h.md#section)",
    ])
    assert [t for _, t in relative_links(sample)] == [
        "docs/a.md", "images/b.png", "ref/g.md", "h.md#section"]
