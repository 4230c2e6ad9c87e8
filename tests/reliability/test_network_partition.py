"""A worker cut off from the network in the middle of a job, on a real second host.

The second host is a network namespace joined to this one by a veth pair. PostgreSQL listens
on 127.0.0.1 only, so the worker in the namespace reaches it through a TCP forwarder on the
host end of the link. No broker: each worker runs one delivery of the job through the
pipeline's entry point (`worker.pipeline.run`), as the Celery task does.

The story: the namespaced worker claims the job (delivery 1) and starts verifying its
candidate; its link goes down; the sweeper sees its heartbeat go silent and requeues the job;
a worker on the host claims it (delivery 2); the link comes back while delivery 2 still works,
and delivery 1's publish arrives late. The fencing check (the attempt number each delivery
claimed) refuses it: delivery 1 stops without recording anything but the refusal, its staged
weights are deleted, and the one version published is delivery 2's."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.audit.models import AuditEvent
from app.certificates.models import Certificate
from app.core.db import make_engine, make_sessionmaker, session_scope
from app.jobs import scheduled
from app.jobs.models import UnlearningJob
from app.models_registry.models import ModelVersion
from app.requests.models import DeletionRequest
from tests.conftest import service_unavailable
from tests.reliability.test_worker_faults import final_files
from tests.worker.conftest import FAST_POLICY, cached_world, make_deployment
from tests.worker.services import REPO
from tests.worker.test_pipeline import BATCH, submit_subjects

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.slow]

# The gate is not under test here: every candidate passes, so delivery 1 reaches its publish.
# A short run: the story needs a job that lasts seconds, not a good one.
POLICY: dict[str, Any] = {**FAST_POLICY, "method_config": {"max_steps": 60}, "verification": {
    **FAST_POLICY["verification"], "min_indiscernibility": 0.0, "max_test_accuracy_drop": 1.0,
    "min_ks_p_value": 0.0}}
HEARTBEAT_SECONDS = 0.5
SILENCE = 2.0  # the sweeper's heartbeat timeout: a worker this quiet is lost
TCP_RTO_MAX_MS = 44  # linux/tcp.h (6.15+): cap a socket's retransmission back-off
# One delivery of the job, as the Celery task runs it; prints what happened. With `redelivery`
# it starts once the sweeper has requeued the job (when its message would be sent again), so
# the process is up and the link need not stay down through its start-up.
DELIVERY = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from app.jobs.models import UnlearningJob
from worker import context, pipeline
ctx, job_id = context.current(), sys.argv[1]
deadline = time.monotonic() + 120
while sys.argv[2:] == ["redelivery"] and time.monotonic() < deadline:
    with ctx.session() as db_session:
        job = db_session.get(UnlearningJob, job_id)
        if (job.status, job.attempt) == ("queued", 1):
            break
    time.sleep(0.05)
print("outcome:", pipeline.run(ctx, job_id), flush=True)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Link:
    """A network namespace (the second host) and the veth pair that is its only link."""

    namespace: str
    host_side: str
    host_ip: str

    def cut(self) -> None:
        ip("link", "set", self.host_side, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_side, "up")


@pytest.fixture
def link() -> Iterator[Link]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a network namespace needs root and iproute2's `ip`")
    tag = os.getpid()
    namespace, host_side, ns_side = f"lethe-part-{tag}", f"lph{tag}", f"lpn{tag}"
    subnet = f"10.231.{tag % 250}"
    host_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"

    def remove() -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            ip("link", "del", host_side)  # both ends of the pair
        with contextlib.suppress(subprocess.SubprocessError):
            ip("netns", "del", namespace)

    try:
        ip("netns", "add", namespace)
        ip("link", "add", host_side, "type", "veth", "peer", "name", ns_side)
        ip("link", "set", ns_side, "netns", namespace)
        ip("addr", "add", f"{host_ip}/30", "dev", host_side)
        ip("link", "set", host_side, "up")
        inside = ["netns", "exec", namespace, "ip"]
        ip(*inside, "addr", "add", f"{ns_ip}/30", "dev", ns_side)
        ip(*inside, "link", "set", ns_side, "up")
        ip(*inside, "link", "set", "lo", "up")
        # After the link returns, resend within a second instead of TCP's minutes-long
        # back-off, without giving up on a connection any sooner (this namespace's own
        # settings; the host's are untouched).
        subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w",
                        "net.ipv4.tcp_rto_max_ms=1000", "net.ipv4.tcp_syn_retries=60",
                        "net.ipv4.tcp_retries2=60"], capture_output=True, timeout=10)
    except subprocess.CalledProcessError as error:
        remove()
        service_unavailable("A network namespace with a veth pair",
                            RuntimeError(f"{' '.join(error.cmd)}: {error.stderr.strip()}"))
    try:
        yield Link(namespace, host_side, host_ip)
    finally:
        remove()


@dataclass
class Forwarder:
    """A TCP forwarder on the host end of the link: ``listen`` -> ``target``."""

    listen: tuple[str, int]
    target: tuple[str, int]
    sockets: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = socket.create_server(self.listen)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            with contextlib.suppress(OSError):  # a kernel without TCP_RTO_MAX_MS
                client.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, 1000)
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class Delivery:
    """A worker process running one delivery of the job; its output goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def outcome(self, timeout: float) -> str:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not end within {timeout}s:\n"
                                 f"{self.output()[-4000:]}") from None
        lines = [line for line in self.output().splitlines() if line.startswith("outcome: ")]
        assert self.process.returncode == 0 and lines, self.output()[-4000:]
        return lines[-1].removeprefix("outcome: ")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str,
               alive: list[Delivery]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        for delivery in alive:
            if delivery.process.poll() is not None:
                raise AssertionError(f"a worker ended while waiting for {what}:\n"
                                     f"{delivery.output()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n" + "\n---\n".join(
        delivery.output()[-3000:] for delivery in alive))


@dataclass
class Stage:
    """The job's database (seen from the host), the data folder the workers share, and a way
    to start a delivery on either host."""

    sessions: sessionmaker[Session]
    data_dir: Path
    logs: Path
    deliveries: list[Delivery]
    job_id: str = ""
    request_ids: list[str] = field(default_factory=list)

    def job(self) -> UnlearningJob:
        with session_scope(self.sessions) as db_session:
            row = db_session.get(UnlearningJob, self.job_id)
            assert row is not None
            return row

    def sweep(self) -> bool:
        """The sweeper's pass; True once it has requeued the job."""
        with session_scope(self.sessions) as db_session:
            return scheduled.requeue_lost(db_session, heartbeat_timeout=SILENCE) == [self.job_id]

    def deliver(self, name: str, database_url: str, *prefix: str, redelivery: bool = False
                ) -> Delivery:
        log = self.logs / f"{name}.log"
        env = {**os.environ, "LETHE_DATABASE_URL": database_url,
               "LETHE_DATA_DIR": str(self.data_dir), "LETHE_SECRET_KEY": "test",
               "LETHE_DEVICE": "cpu", "LETHE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
        with log.open("wb") as output:
            command = [*prefix, sys.executable, "-c", DELIVERY, self.job_id]
            process = subprocess.Popen(command + ["redelivery"] * redelivery,
                                       env=env, cwd=REPO, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.deliveries.append(Delivery(process, log))
        return self.deliveries[-1]


@pytest.fixture
def stage(postgres_url: str, tmp_path: Path) -> Iterator[Stage]:
    """The world registered as in tests/worker (in-process API) and one job planned."""
    engine = make_engine(postgres_url)
    stage = Stage(make_sessionmaker(engine), tmp_path / "data", tmp_path, [])
    try:
        for deployment in make_deployment(postgres_url, stage.data_dir, cached_world(),
                                          POLICY):
            stage.request_ids = submit_subjects(deployment, deployment.subjects(BATCH))
            with session_scope(stage.sessions) as db_session:
                (planned,) = scheduled.plan_batches(db_session)
                stage.job_id = planned.id
            yield stage
    finally:
        for delivery in stage.deliveries:
            delivery.stop()
        engine.dispose()


def test_a_worker_cut_off_mid_job_cannot_publish_when_its_link_returns(
        postgres_url: str, link: Link, stage: Stage) -> None:
    started = time.monotonic()
    database = make_url(postgres_url)
    forwarder = Forwarder((link.host_ip, 0), (database.host or "127.0.0.1", database.port or 5432))
    # A session left holding a lock when the link went down is ended by the server, so the
    # sweeper and the next delivery are not blocked behind a worker that cannot answer.
    remote_url = database.set(host=link.host_ip, port=forwarder.port, query={
        "options": "-c idle_in_transaction_session_timeout=10000"}
    ).render_as_string(hide_password=False)
    try:
        cut_off = stage.deliver("cut-off", remote_url, "ip", "netns", "exec", link.namespace)
        host = stage.deliver("host", postgres_url, redelivery=True)
        wait_until(lambda: stage.job().status == "verifying", timeout=90,
                   what="the cut-off worker to verify its candidate", alive=[cut_off, host])
        first = stage.job()
        assert first.attempt == 1
        link.cut()
        cut_at = time.monotonic()
        wait_until(stage.sweep, timeout=30, what="the sweeper to requeue the silent job",
                   alive=[cut_off, host])
        wait_until(lambda: stage.job().attempt == 2, timeout=60,
                   what="the host worker to claim the job", alive=[cut_off, host])
        second = stage.job()
        assert second.status == "running" and second.worker_host != first.worker_host
        link.restore()
        cut_for = time.monotonic() - cut_at

        assert cut_off.outcome(timeout=60) == "superseded"
        assert "refused publish" in cut_off.output()
        assert host.outcome(timeout=120) == "published"
        check_one_version_delivery_2s(stage, first, second)
        print(f"\nlink down {cut_for:.1f}s; test {time.monotonic() - started:.1f}s")
    finally:
        forwarder.close()


def check_one_version_delivery_2s(stage: Stage, first: UnlearningJob, second: UnlearningJob
                                  ) -> None:
    """One version published, delivery 2's; delivery 1 left the refusal and nothing else."""
    job_id, request_ids = stage.job_id, stage.request_ids
    with session_scope(stage.sessions) as db_session:
        job = db_session.get(UnlearningJob, job_id)
        assert job is not None
        assert (job.status, job.attempt, job.worker_host, job.failure_reason) == (
            "succeeded", 2, second.worker_host, None)
        versions = db_session.scalars(select(ModelVersion).order_by(ModelVersion.number)).all()
        assert [(v.number, v.status) for v in versions] == [(1, "superseded"), (2, "published")]
        assert versions[1].job_id == job_id and versions[1].verification_report == job.report
        events = [(e.action, e.details) for e in db_session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == job_id).order_by(AuditEvent.seq))]
        assert [action for action, _ in events] == [
            "job.created", "job.started", "job.requeued", "job.started",
            "job.stale_write_refused", "job.succeeded"], events
        assert (events[1][1]["attempt"], events[1][1]["worker"]) == (1, first.worker_host)
        assert events[4][1]["write"] == "publish" and events[4][1]["attempt"] == 1
        # refused while delivery 2 was still at work: the case where, unfenced, the stale
        # publish would have gone through
        assert events[4][1]["current_attempt"] == 2
        assert events[4][1]["status"] in ("running", "verifying")
        assert (events[5][1]["attempt"], events[5][1]["worker"]) == (2, second.worker_host)
        statuses = {request_id: status for request_id, status in db_session.execute(
            select(DeletionRequest.id, DeletionRequest.status))}
        certified = list(db_session.scalars(select(Certificate.request_id)))
    assert statuses == dict.fromkeys(request_ids, "completed")
    assert sorted(certified) == sorted(request_ids)  # one certificate each
    staging = stage.data_dir / "artifacts" / ".staging"
    assert not list(staging.glob("*")), "a staged candidate was left behind"
    assert final_files(stage.data_dir) == {v.artifact_uri: v.sha256 for v in versions}
