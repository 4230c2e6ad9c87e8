"""The README's configuration table names every setting, so an operator never has to read
app/core/config.py to learn that one exists."""

from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    documented = set(re.findall(r"`LETHE_([A-Z0-9_]+)`", README.read_text()))
    missing = sorted(f"LETHE_{name.upper()}" for name in Settings.model_fields
                     if name.upper() not in documented)
    assert not missing, f"settings missing from README.md's configuration table: {missing}"


def test_the_readme_links_the_own_model_guide() -> None:
    assert "(docs/own-model.md)" in README.read_text()
