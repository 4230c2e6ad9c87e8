#!/usr/bin/env bash
# Create .venv (or reuse it when it already holds this pyproject's install) and install Lethe
# with everything it needs: torch and torchvision included, the dev extra for the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.lethe-installed
wanted=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-64)

if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: on the build machines pip
  # takes them from local disk (about a minute); elsewhere they come from PyPI.
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$wanted" > "$stamp"
fi

# The dashboard's browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download is not used). Installed when missing and we may (root with apt-get);
# otherwise those tests skip with the reason, or fail under LETHE_REQUIRE_SERVICES=1.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the dashboard's browser tests" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }) \
      || echo "could not install chromium; the browser tests will say so" >&2
  else
    echo "chromium not found (apt-get install chromium); the browser tests will say so" >&2
  fi
fi
