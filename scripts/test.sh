#!/usr/bin/env bash
# Install (or reuse) .venv, lint (ruff) and type-check (mypy) the code, then run the whole test
# suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check app worker unlearning tests benchmarks migrations
.venv/bin/mypy  # the files and settings are pyproject.toml's [tool.mypy]
exec .venv/bin/python -m pytest "$@"
