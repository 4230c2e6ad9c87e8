#!/usr/bin/env bash
# Install (or reuse) .venv and run Lethe's main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/lethe demo "$@"
