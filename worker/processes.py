"""The processes `lethe` runs beside itself: the embedded broker when the settings name
none, and API, worker and beat as children, supervised and stopped warmly. Shared by
`lethe up` (worker/cli.py), `lethe demo` (worker/demo.py) and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click

from app.core.config import get_settings


@contextmanager
def embedded_broker_if_needed() -> Iterator[None]:
    """On the embedded default, make sure the data dir's broker runs; stop it afterwards if
    this process started it (the server would otherwise outlive us)."""
    settings = get_settings()
    if settings.broker_url:
        yield
        return
    from worker.embedded_broker import EmbeddedBroker

    broker = EmbeddedBroker(settings.embedded_broker_socket)
    started = broker.start()
    try:
        yield
    finally:
        if started:
            broker.stop()


def start_services(host: str, port: int, *, log_dir: str | None = None
                   ) -> dict[str, subprocess.Popen[bytes]]:
    """Start API, worker and beat as child processes of this one."""
    lethe = [sys.executable, "-m", "worker.cli"]
    commands = {
        "api": [*lethe, "serve", "--host", host, "--port", str(port), "--no-migrate"],
        "worker": [*lethe, "worker"],
        "beat": [*lethe, "beat"],
    }
    processes = {}
    for name, command in commands.items():
        output = open(os.path.join(log_dir, f"{name}.log"), "ab") if log_dir else None  # noqa: SIM115
        processes[name] = subprocess.Popen(command, stdout=output, stderr=output)
    return processes


def supervise(processes: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait until a service exits or we are told to stop; returns the exit code to use."""
    stop = {"signal": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop["signal"]:
        for name, process in processes.items():
            if process.poll() is not None:
                click.echo(f"{name} exited with {process.returncode}; stopping", err=True)
                return process.returncode or 1
        time.sleep(0.5)
    return 0


def stop_services(processes: dict[str, subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Warm shutdown: SIGTERM lets the worker finish or hand back its job (late acks)."""
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes.values():
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
