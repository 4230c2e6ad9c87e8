"""Container health probes, run by Docker's HEALTHCHECK (stdlib only: they start fast).

    python -m app.observability.probes http URL          # 2xx within 4 s
    python -m app.observability.probes fresh GLOB SECONDS  # a file matching GLOB changed lately

`fresh` is for Celery beat, which rewrites its schedule file as it ticks."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import urllib.error
import urllib.request


def http_ok(url: str, timeout: float = 4.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def recently_changed(pattern: str, seconds: float) -> bool:
    now = time.time()
    return any(now - mtime <= seconds for mtime in
               (_mtime(path) for path in glob.glob(pattern)) if mtime is not None)


def _mtime(path: str) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m app.observability.probes")
    probes = root.add_subparsers(dest="probe", required=True)
    http = probes.add_parser("http", help="GET a URL; healthy on a 2xx answer")
    http.add_argument("url")
    fresh = probes.add_parser("fresh", help="a file matching GLOB changed within SECONDS")
    fresh.add_argument("pattern")
    fresh.add_argument("seconds", type=float)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    healthy = (http_ok(args.url) if args.probe == "http"
               else recently_changed(args.pattern, args.seconds))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
