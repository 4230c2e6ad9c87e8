"""Fencing a job's deliveries: once the sweeper has requeued a job whose worker stopped
heart-beating and another delivery has claimed it, everything the old delivery writes is
refused (its heartbeat and progress quietly, its publish and the other state changes with
`StaleAttempt`), so exactly one version is published: the current delivery's.
tests/reliability/test_network_partition.py plays the same story with a real partition."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.models import AuditEvent
from app.auth import service as keys
from app.auth.models import Role
from app.auth.service import Principal
from app.certificates import signing
from app.certificates.service import Signer
from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, session_scope, utcnow
from app.core.security import subject_hash
from app.datasets import service as datasets
from app.datasets.models import DatasetCreate, Sample
from app.jobs import flows, scheduled
from app.jobs.models import UnlearningJob
from app.models_registry import service as registry
from app.models_registry.artifacts import ArtifactStore, StagedArtifact
from app.models_registry.models import EscalationPolicy, Model, ModelVersion, Policy
from app.requests import intake, lifecycle
from app.requests.models import SubjectRequest
from tests.api.seed import MLP
from worker.context import WorkerContext
from worker.pipeline import ProgressWriter

SECRET = b"fencing-test-secret"
MODEL = "digits-mlp"
GOOD = {"passed": True, "reasons": [], "summary": {"passed": True}}
BAD = {"passed": False, "reasons": ["membership attack"], "summary": {"passed": False}}


@dataclass
class Deployment:
    sessions: sessionmaker[Session]
    store: ArtifactStore
    signer: Signer
    job_id: str

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.sessions)

    def staged(self) -> StagedArtifact:
        path = self.store.new_staging_path()
        path.write_bytes(secrets.token_bytes(256))  # what the weights hold does not matter
        return self.store.stage_file(path)

    def claim(self, worker: str) -> int:
        with self.session() as db_session:
            job = flows.start(db_session, job_id=self.job_id, worker_host=worker, task_id=None,
                              heartbeat_timeout=60)
            assert job is not None, "the claim was refused"
            return job.attempt

    def lose_worker(self) -> None:
        """The sweeper's pass after the worker's heartbeat went silent."""
        with self.session() as db_session:
            db_session.execute(update(UnlearningJob).where(UnlearningJob.id == self.job_id)
                               .values(heartbeat_at=utcnow() - timedelta(minutes=5)))
            db_session.commit()
            assert scheduled.requeue_lost(db_session, heartbeat_timeout=60) == [self.job_id]

    def job(self) -> UnlearningJob:
        with self.session() as db_session:
            job = db_session.get(UnlearningJob, self.job_id)
            assert job is not None
            return job

    def versions(self) -> list[tuple[int, str]]:
        with self.session() as db_session:
            return [(v.number, v.status) for v in db_session.scalars(
                select(ModelVersion).order_by(ModelVersion.number))]

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        with self.session() as db_session:
            return [(e.action, e.details) for e in db_session.scalars(
                select(AuditEvent).where(AuditEvent.entity_id == self.job_id)
                .order_by(AuditEvent.seq))]

    def forgotten(self) -> dict[int, str]:
        with self.session() as db_session:
            (target,) = lifecycle.targets_of(db_session, job_id=self.job_id)
            samples = db_session.scalars(select(Sample).where(
                Sample.subject_hash == subject_hash(SECRET, "customer-0"))).all()
            return {sample.id: target.request_id for sample in samples}


@pytest.fixture
def deployment(database_url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A model at version 1 in production and one queued job carrying one request."""
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    store = ArtifactStore(tmp_path / "artifacts")
    signer = Signer.from_pem(signing.generate_private_key_pem())
    with session_scope(sessions) as db_session:
        dataset = datasets.create(db_session, dataset_in=DatasetCreate(name="digits"),
                                  actor="system")
        db_session.add_all([Sample(dataset_id=dataset.id, sample_key=f"s-{i}",
                                   subject_hash=subject_hash(SECRET, f"customer-{i // 4}"),
                                   label=i % 10, split="train", locator=f"train.safetensors#{i}")
                            for i in range(8)])
        policy = Policy.model_validate({"verification": {"require_references": False},
                                        "batching": {"max_batch": 1}})
        model = Model(name=MODEL, architecture=MLP, dataset_id=dataset.id,
                      policy=policy.model_dump(mode="json"))
        db_session.add(model)
        db_session.flush()
        staged = Deployment(sessions, store, signer, "").staged()
        registry.add_version(db_session, model=model, staged=staged, store=store,
                             actor="system")
        registry.set_alias(db_session, model=model, alias="production", number=1,
                           actor="system")
        key, _ = keys.create(db_session, role=Role.requester, client_id="acme")
        intake.submit_many(db_session, [intake.Submission(
            Principal(key_id=key.id, role=Role.requester, client_id="acme"),
            SubjectRequest(kind="subject", subject_ref="customer-0", model=MODEL))],
            secret_key=SECRET)
        (job,) = scheduled.plan_batches(db_session)
        job_id = job.id
    yield Deployment(sessions, store, signer, job_id)
    engine.dispose()


def publish(deployment: Deployment, attempt: int, staged: StagedArtifact | None = None
            ) -> ModelVersion:
    with deployment.session() as db_session:
        return flows.candidate_passed(
            db_session, job_id=deployment.job_id, attempt=attempt,
            staged=staged or deployment.staged(), store=deployment.store,
            signer=deployment.signer, report=GOOD, metrics={}, forgotten=deployment.forgotten())


def test_a_delivery_the_sweeper_replaced_cannot_publish_and_the_new_one_can(
        deployment: Deployment) -> None:
    assert deployment.claim("host-a:1") == 1
    deployment.lose_worker()
    assert deployment.claim("host-b:2") == 2

    late = deployment.staged()
    with pytest.raises(flows.StaleAttempt) as refused:
        publish(deployment, 1, late)
    assert refused.value.retry is False and "delivery 1" in str(refused.value)
    assert late.path.exists()  # not consumed: the stale worker discards it
    assert deployment.versions() == [(1, "published")]
    job = deployment.job()
    assert (job.status, job.attempt, job.worker_host) == ("running", 2, "host-b:2")

    version = publish(deployment, 2)
    assert deployment.versions() == [(1, "superseded"), (2, "published")]
    assert version.number == 2
    job = deployment.job()
    assert (job.status, job.attempt, job.report) == ("succeeded", 2, GOOD)
    events = deployment.events()
    assert [action for action, _ in events] == [
        "job.created", "job.started", "job.requeued", "job.started", "job.stale_write_refused",
        "job.succeeded"]
    assert events[4][1] == {"write": "publish", "attempt": 1, "current_attempt": 2,
                            "status": "running"}
    assert events[5][1]["attempt"] == 2 and events[5][1]["worker"] == "host-b:2"


def test_a_requeued_job_refuses_its_old_delivery_before_anyone_claims_it_again(
        deployment: Deployment) -> None:
    deployment.claim("host-a:1")
    deployment.lose_worker()
    with pytest.raises(flows.StaleAttempt):
        publish(deployment, 1)
    assert deployment.job().status == "queued"
    assert deployment.versions() == [(1, "published")]
    assert deployment.claim("host-b:2") == 2  # the redelivery runs as usual


def test_a_stale_heartbeat_does_not_keep_the_new_delivery_alive(
        deployment: Deployment) -> None:
    deployment.claim("host-a:1")
    deployment.lose_worker()
    deployment.claim("host-b:2")
    long_ago = utcnow() - timedelta(minutes=10)
    with deployment.session() as db_session:
        db_session.execute(update(UnlearningJob).where(UnlearningJob.id == deployment.job_id)
                           .values(heartbeat_at=long_ago, phase="match: epoch 1/5"))
        db_session.commit()
        assert flows.heartbeat(db_session, job_id=deployment.job_id, attempt=1) is False
        assert flows.report_progress(db_session, job_id=deployment.job_id, attempt=1,
                                     phase="match: epoch 5/5", step=5, total=5,
                                     metrics={}) is False
    job = deployment.job()
    assert (job.heartbeat_at, job.phase) == (long_ago, "match: epoch 1/5")
    # The sweeper sees the new delivery's silence, whatever the old worker sends.
    with deployment.session() as db_session:
        assert scheduled.requeue_lost(db_session, heartbeat_timeout=60) == [deployment.job_id]
    deployment.claim("host-c:3")
    with deployment.session() as db_session:
        assert flows.heartbeat(db_session, job_id=deployment.job_id, attempt=3) is True
    beat = deployment.job().heartbeat_at
    assert beat is not None and beat > long_ago


StaleWrite = Callable[[Session, Deployment], object]
# Each flow a delivery runs after its claim, by the name its refusal is audited under.
STALE_WRITES: dict[str, StaleWrite] = {
    "begin_verification": lambda s, d: flows.verifying(s, job_id=d.job_id, attempt=1),
    "reject_candidate": lambda s, d: flows.candidate_failed(
        s, job_id=d.job_id, attempt=1, staged=d.staged(), store=d.store, report=BAD,
        metrics={}, escalation=EscalationPolicy(), reason="verification failed"),
    "fail": lambda s, d: flows.abandon(s, job_id=d.job_id, attempt=1, reason="lost its way"),
    "publish": lambda s, d: flows.candidate_passed(
        s, job_id=d.job_id, attempt=1, staged=d.staged(), store=d.store, signer=d.signer,
        report=GOOD, metrics={}, forgotten=d.forgotten()),
    "complete_unchanged": lambda s, d: flows.complete_unchanged(
        s, job_id=d.job_id, attempt=1, signer=d.signer, report=GOOD,
        forgotten=d.forgotten()),
    "requeue": lambda s, d: flows.requeue(s, job_id=d.job_id, attempt=1, reason="base moved"),
    "fail_requests": lambda s, d: flows.fail_requests(
        s, job_id=d.job_id, attempt=1, request_reasons={"any": "unreadable"}),
}


@pytest.mark.parametrize("write", sorted(STALE_WRITES))
def test_every_state_change_of_a_stale_delivery_is_refused_and_recorded(
        deployment: Deployment, write: str) -> None:
    deployment.claim("host-a:1")
    deployment.lose_worker()
    deployment.claim("host-b:2")
    before = deployment.job()
    with deployment.session() as db_session, pytest.raises(flows.StaleAttempt):
        STALE_WRITES[write](db_session, deployment)
    after = deployment.job()
    assert (after.status, after.attempt, after.phase, after.escalation_level, after.report,
            after.failure_reason) == ("running", 2, before.phase, 0, None, None)
    assert deployment.versions() == [(1, "published")]
    with deployment.session() as db_session:
        (target,) = lifecycle.targets_of(db_session, job_id=deployment.job_id)
        assert target.status == "processing"
    action, details = deployment.events()[-1]
    assert (action, details["write"], details["attempt"]) == (
        "job.stale_write_refused", write, 1)


def test_the_stale_worker_stops_at_its_next_progress_write(
        deployment: Deployment, database_url: str, tmp_path: Path) -> None:
    deployment.claim("host-a:1")
    deployment.lose_worker()
    deployment.claim("host-b:2")
    ctx = WorkerContext(Settings(data_dir=tmp_path, database_url=database_url,
                                 secret_key="test"))
    progress = ProgressWriter(ctx, deployment.job_id, 1, prefix="match: ")
    with pytest.raises(flows.StaleAttempt):  # raised into the method: it stops computing
        progress("epoch 3/5", 3, 5, {"loss": 0.5})
    ctx.engine.dispose()
    assert deployment.job().phase == "starting"  # delivery 2's, untouched


def test_a_failed_candidate_escalates_while_the_policy_allows_then_fails_the_job(
        deployment: Deployment) -> None:
    attempt = deployment.claim("host-a:1")
    request_id = next(iter(deployment.forgotten().values()))
    rounds = []
    for _ in range(3):
        with deployment.session() as db_session:
            flows.verifying(db_session, job_id=deployment.job_id, attempt=attempt)
            level = flows.candidate_failed(
                db_session, job_id=deployment.job_id, attempt=attempt,
                staged=deployment.staged(), store=deployment.store, report=BAD, metrics={},
                escalation=EscalationPolicy(), reason="verification failed: for the batch",
                request_reasons={request_id: "verification failed: for this request"})
            (target,) = lifecycle.targets_of(db_session, job_id=deployment.job_id)
            rounds.append((level, target.status))
    # stronger settings, then exact retrain (the target back to processing each time), then
    # no level is left
    assert rounds == [(1, "processing"), (2, "processing"), (None, "failed")]
    assert deployment.versions() == [(1, "published"), (2, "rejected"), (3, "rejected"),
                                     (4, "rejected")]
    job = deployment.job()
    assert (job.status, job.escalation_level, job.failure_reason) == (
        "failed", 2, "verification failed: for the batch")
    with deployment.session() as db_session:
        (target,) = lifecycle.targets_of(db_session, job_id=deployment.job_id)
        assert (target.status, target.failure_reason) == (
            "failed", "verification failed: for this request")
    assert [action for action, _ in deployment.events()][-3:] == [
        "job.escalated", "job.escalated", "job.failed"]


@pytest.mark.parametrize(("stronger", "retrain", "after"), [
    (True, True, {0: 1, 1: 2, 2: None}), (True, False, {0: 1, 1: None, 2: None}),
    (False, True, {0: 2, 1: 2, 2: None}), (False, False, {0: None, 1: None, 2: None})])
def test_escalation_goes_stronger_then_to_retrain_as_the_policy_allows(
        stronger: bool, retrain: bool, after: dict[int, int | None]) -> None:
    escalation = EscalationPolicy(stronger_attempt=stronger, allow_retrain=retrain)
    assert {level: flows.next_escalation(escalation, level) for level in after} == after
