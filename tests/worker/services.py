"""Real processes for end-to-end tests: the API under uvicorn, Celery worker and beat (or
`lethe up` for the embedded default), each with its own log file, always stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Services:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        # Own process group: SIGKILL reaches the prefork pool's children too.
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=self.env,
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_api(self) -> None:
        self.start("api", "serve", "--port", str(self.port), "--migrate")
        self.wait_until(lambda: self._ready(), timeout=90, what="the API to answer")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, name: str, timeout: float = 30) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_until(self, condition: Callable[[], Any], *, timeout: float, what: str,
                   every: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited ({process.returncode}) while waiting "
                                         f"for {what}:\n{self.log(name)[-4000:]}")
            time.sleep(every)
        logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in ("api", "worker", "beat",
                                                                      "up"))
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
