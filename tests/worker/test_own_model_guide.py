"""docs/own-model.md, followed step by step: its files written, its shell blocks run in order
in one shell, from an empty folder to a served version 1 of a model Lethe has never seen and a
certificate for one of its subjects. When the service and the guide drift apart, this fails."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "own-model.md"
BLOCK = re.compile(r"^```(\w+)(?: file=(\S+))?\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TIMEOUT = 900


def guide_blocks() -> list[tuple[str, str | None, str]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(GUIDE.read_text())]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_guide_has_files_and_shell_steps() -> None:
    blocks = guide_blocks()
    files = [name for _, name, _ in blocks if name]
    assert files == ["tiny_net.py", "prepare.py", "model.json"]
    assert sum(1 for language, name, _ in blocks if language == "bash" and not name) >= 6


@pytest.mark.slow
def test_a_new_user_following_the_guide_gets_a_served_model_and_a_certificate(
        tmp_path: Path) -> None:
    script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for language, name, body in guide_blocks():
        if name:
            (tmp_path / name).write_text(body)
        elif language == "bash":
            script.append(body)
            script.append('echo "@@ step done at $SECONDS s"')
    (tmp_path / "guide.sh").write_text("\n".join(script) + "\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LETHE_")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               PYTHONPATH=str(REPO), LETHE_PORT=str(free_port()))
    started = time.monotonic()
    process = subprocess.Popen(["bash", "guide.sh"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):  # `lethe up` and its children, if left
            os.killpg(process.pid, signal.SIGTERM)
    log = (tmp_path / "lethe.log").read_text() if (tmp_path / "lethe.log").exists() else ""
    assert process.returncode == 0, f"{output[-6000:]}\n--- lethe.log ---\n{log[-6000:]}"
    steps = [line.split(" at ")[-1] for line in output.splitlines() if line.startswith("@@")]
    print(f"\nthe guide ran in {time.monotonic() - started:.0f} s; its shell blocks ended at "
          f"{', '.join(steps)} (version 1 is served at the end of the 5th)")
    assert re.search(r"request [0-9a-f-]+: completed", output), output[-4000:]
    assert "VALID:" in output and "evidence: per-sample" in output, output[-4000:]
    # the predict call printed the version it was answered by
    assert re.search(r"^1$", output, re.MULTILINE), output[-4000:]
