"""A world for the dashboard to show, written through the domain services exactly as the API
and the worker write it: a dataset, two models, versions produced by jobs (published,
superseded, rejected), requests in every state with spread-out deadlines, a running job with
live progress, a failed one with its report, certificates and the audit trail; reference sets
built through the worker's side of the references service (one ready, one running, one
failed), and a published version whose report carries the per-request test."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.auth import service as keys
from app.auth.models import Role
from app.auth.service import Principal
from app.certificates.service import Signer
from app.core.db import session_scope, utcnow
from app.core.errors import Problem
from app.core.security import subject_hash
from app.datasets import service as datasets
from app.datasets.models import DatasetCreate, Sample
from app.jobs import flows, scheduled
from app.jobs.models import UnlearningJob
from app.models_registry import service as registry
from app.models_registry.artifacts import ArtifactStore, StagedArtifact
from app.models_registry.models import EscalationPolicy, Model, Policy, VersionStatus
from app.references import service as references
from app.references.models import ReferenceSet
from app.requests import intake, lifecycle
from app.requests import service as requests
from app.requests.models import ClassRequest, DeletionRequest, RequestStatus, SubjectRequest
from unlearning.verification.per_sample import PerSampleEvidence, RequestEvidence

MODEL = "fashion-cnn"
APPROVAL_MODEL = "digits-mlp"


@dataclass
class Seeded:
    keys: dict[str, str] = field(default_factory=dict)  # role -> plain API key
    requests: dict[str, str] = field(default_factory=dict)  # label -> request id
    jobs: dict[str, str] = field(default_factory=dict)  # label -> job id
    reference_sets: dict[str, int] = field(default_factory=dict)  # label -> set id


def report(*, passed: bool, mia_accuracy: float, test_accuracy: float,
           base_test_accuracy: float = 0.912, n: int = 60) -> dict[str, Any]:
    """A verification report in the worker's shape (worker/pipeline.py: summarize)."""
    reasons = [] if passed else [
        f"membership attack accuracy {mia_accuracy:.3f} (n={n}) gives indiscernibility "
        f"{1 - abs(mia_accuracy - 0.5) / 0.5:.3f} < 0.9"]
    summary = {"passed": passed, "n_forget": n, "method": "match", "escalation_level": 0,
               "mia_accuracy": mia_accuracy, "mia_auc": mia_accuracy + 0.02, "mia_n": n,
               "indiscernibility": 1 - abs(mia_accuracy - 0.5) / 0.5,
               "base_mia_accuracy": 0.74, "test_accuracy": test_accuracy,
               "base_test_accuracy": base_test_accuracy, "forget_accuracy": 0.55}
    return {"version": 1, "passed": passed, "reasons": reasons, "n_forget": n,
            "mia": {"candidate": {"accuracy": mia_accuracy, "auc": mia_accuracy + 0.02,
                                  "n_members": n}},
            "utility": {"test_accuracy": test_accuracy,
                        "base_test_accuracy": base_test_accuracy},
            "summary": summary}


# The reference sets below: 8 models, each storing its OUT half of the live training samples
# and every holdout sample; model i's wall seconds are REFERENCE_SECONDS + i / 2.
REFERENCES, REFERENCE_SECONDS = 8, 30.0


def evidence_report(*, mia_accuracy: float, test_accuracy: float, request_id: str,
                    reference_set: int | None) -> dict[str, Any]:
    """A passing report of the current shape (unlearning/verification/report.py: to_dict):
    evidence, outcome and the method's run; per-sample figures for ``request_id`` when the
    job read ``reference_set``, else population-only with the note saying why."""
    body = report(passed=True, mia_accuracy=mia_accuracy, test_accuracy=test_accuracy)
    run = {"method": "match", "escalation_level": 0, "steps": 100, "seconds": 12.5,
           "parent_tensor_sha256": "a" * 64, "tensor_sha256": "b" * 64,
           "weights_changed": True}
    per_sample = None if reference_set is None else PerSampleEvidence(
        requests=[RequestEvidence(request_id=request_id, n=4, n_testable=3, mean_score=0.21,
                                  p_value=0.41, flagged=False, mean_score_before=2.37,
                                  p_before=0.0012, flagged_before=True,
                                  detectable_shift=1.37)],
        references=4, reference_models=4, alpha=0.05, spread="pooled", pooled_spread=0.93,
        n_null=20, reference_set=reference_set).to_dict()
    evidence = "per-sample" if per_sample else "population-only"
    body.update(version=2, evidence=evidence, outcome="unlearned", run=run,
                per_sample=per_sample, per_sample_note=None if per_sample else
                "the model had no ready reference set when the job ran")
    body["summary"].update(evidence=evidence, outcome="unlearned", method_steps=100,
                           weights_changed=True)
    if per_sample:
        body["summary"].update(per_sample_requests=1, per_sample_flagged=0,
                               per_sample_flagged_before=1, per_sample_not_testable=1)
    return body


def _reference_set(db_session: Session, model: Model, *, stored: int, finish: bool,
                   worker: str) -> ReferenceSet:
    """A set asked for and built the way the worker builds one (claim, one stored model at a
    time, then ready), or left running after ``stored`` models."""
    reference_set, created = references.request_build(db_session, model=model,
                                                       actor="key:seed", references=REFERENCES)
    assert created
    live = list(db_session.scalars(select(Sample).where(
        Sample.dataset_id == model.dataset_id, Sample.forgotten_at.is_(None))
        .order_by(Sample.id)))
    train = [sample for sample in live if sample.split == "train"]
    holdout = [sample for sample in live if sample.split == "holdout"]
    claimed = references.claim(db_session, set_id=reference_set.id, worker_host=worker,
                               heartbeat_timeout=600, n_train=len(train),
                               n_holdout=len(holdout))
    assert claimed is not None
    for index in range(stored):
        out = [sample for position, sample in enumerate(train) if (position + index) % 2]
        references.store_reference(
            db_session, set_id=reference_set.id, index=index,
            rows=[(sample.id, -1.0 + 0.01 * n) for n, sample in enumerate(out + holdout)],
            seconds=REFERENCE_SECONDS + index / 2)
    if finish:
        return references.finish(db_session, set_id=reference_set.id)
    references.heartbeat(db_session, set_id=reference_set.id,
                         phase=f"reference {stored + 1}/{REFERENCES}: train")
    return reference_set


def _staged(store: ArtifactStore) -> StagedArtifact:
    path = store.new_staging_path()
    path.write_bytes(secrets.token_bytes(256))  # weights' bytes do not matter to the pages
    return store.stage_file(path)


def _forgotten(db_session: Session, job_id: str) -> dict[int, str]:
    forgotten: dict[int, str] = {}
    for target in lifecycle.targets_of(db_session, job_id=job_id):
        request = db_session.get(DeletionRequest, target.request_id)
        assert request is not None
        model = db_session.get(Model, target.model_id)
        assert model is not None
        for sample in requests.samples_covered(db_session, request=request,
                                               dataset_id=model.dataset_id):
            forgotten[sample.id] = request.id
    return forgotten


def _next_job(db_session: Session) -> UnlearningJob:
    created = scheduled.plan_batches(db_session)
    assert len(created) == 1, created
    job = flows.start(db_session, job_id=created[0].id, worker_host="gpu-worker-1:4242",
                      task_id=None, heartbeat_timeout=600)
    assert job is not None
    return job


def _submit(db_session: Session, principal: Principal, secret_key: bytes, body: Any
            ) -> DeletionRequest:
    (recorded,) = intake.submit_many(db_session, [intake.Submission(principal, body)],
                                     secret_key=secret_key)
    assert not isinstance(recorded, Problem), recorded
    request = db_session.get(DeletionRequest, recorded[0].id)
    assert request is not None
    return request


def seed(factory: sessionmaker[Session], *, store: ArtifactStore, signer: Signer,
         secret_key: bytes, now: datetime | None = None) -> Seeded:
    now = now or utcnow()
    seeded = Seeded()
    with session_scope(factory) as db_session:
        for role, client_name in (("operator", "lethe-ops"), ("auditor", "compliance"),
                                  ("requester", "acme-bank")):
            _, plain = keys.create(db_session, role=Role(role), client_id=client_name)
            seeded.keys[role] = plain
        acme, globex = (Principal(key_id=key.id, role=Role.requester, client_id=key.client_id)
                        for key, _ in (keys.create(db_session, role=Role.requester,
                                                   client_id=client)
                                       for client in ("acme-bank", "globex")))

        for name in ("fashion-mnist", "digits"):
            dataset = datasets.create(db_session, dataset_in=DatasetCreate(name=name),
                                      actor="system")
            rows = [Sample(dataset_id=dataset.id, sample_key=f"{name}-{i:04d}",
                           subject_hash=subject_hash(secret_key, f"customer-{i // 4}"),
                           label=i % 10, split="train", locator=f"train.safetensors#{i}")
                    for i in range(64)]
            rows += [Sample(dataset_id=dataset.id, sample_key=f"{name}-{split}-{i:04d}",
                            subject_hash=None, label=i % 10, split=split,
                            locator=f"{split}.safetensors#{i}")
                     for i in range(20) for split in ("holdout", "test")
                     if not (split == "test" and i >= 10)]
            db_session.add_all(rows)
            # One request per job, so each job below carries exactly the request it is for.
            # globex, a requester, may send the class request queued below.
            policy = Policy.model_validate({"verification": {"require_references": False},
                                            "batching": {"max_batch": 1},
                                            "require_approval": name == "digits",
                                            "scenario_clients": ["globex"]})
            architecture = ({"name": "cnn-small", "kwargs": {"in_channels": 1,
                                                             "num_classes": 10}}
                            if name == "fashion-mnist" else
                            {"name": "mlp", "kwargs": {"in_channels": 1, "input_size": 8,
                                                       "num_classes": 10}})
            model = Model(name=MODEL if name == "fashion-mnist" else APPROVAL_MODEL,
                          architecture=architecture, dataset_id=dataset.id,
                          policy=policy.model_dump(mode="json"))
            db_session.add(model)
            db_session.flush()
            registry.add_version(db_session, model=model, staged=_staged(store), store=store,
                                 actor="key:seed", metrics={"test_accuracy": 0.912})
            registry.set_alias(db_session, model=model, alias="production", number=1,
                               actor="key:seed")
        fashion = registry.get(db_session, name=MODEL)

        # A job whose candidate fails verification with no escalation left: the request fails.
        failed = _submit(db_session, acme, secret_key,
                         SubjectRequest(kind="subject", subject_ref="customer-0", model=MODEL))
        job = _next_job(db_session)
        flows.report_progress(db_session, job_id=job.id, attempt=job.attempt,
                              phase="match: epoch 5/5", step=100, total=100,
                              metrics={"loss": 0.83, "forget_accuracy": 0.97})
        flows.verifying(db_session, job_id=job.id, attempt=job.attempt)
        bad = report(passed=False, mia_accuracy=0.71, test_accuracy=0.905)
        flows.candidate_failed(
            db_session, job_id=job.id, attempt=job.attempt, staged=_staged(store), store=store,
            report=bad, metrics=bad["summary"],
            escalation=EscalationPolicy(stronger_attempt=False, allow_retrain=False),
            reason="verification failed: " + "; ".join(bad["reasons"]))
        seeded.requests["failed"], seeded.jobs["failed"] = failed.id, job.id

        # Two jobs that pass and publish versions 3 and 4, with certificates: the first with
        # population-only evidence, the second with the per-request test, as a reference set
        # became ready between them.
        for label, subject, mia, test in (("completed", "customer-1", 0.53, 0.908),
                                          ("completed-2", "customer-2", 0.51, 0.906)):
            ready = None
            if label == "completed-2":
                ready = _reference_set(db_session, fashion, stored=REFERENCES, finish=True,
                                       worker="gpu-worker-1:4242")
                seeded.reference_sets["ready"] = ready.id
            done = _submit(db_session, acme if label == "completed" else globex, secret_key,
                           SubjectRequest(kind="subject", subject_ref=subject, model=MODEL))
            job = _next_job(db_session)
            flows.report_progress(db_session, job_id=job.id, attempt=job.attempt,
                                  phase="match: epoch 5/5", step=100, total=100,
                                  metrics={"loss": 0.35})
            flows.verifying(db_session, job_id=job.id, attempt=job.attempt)
            good = evidence_report(mia_accuracy=mia, test_accuracy=test, request_id=done.id,
                                   reference_set=ready.id if ready else None)
            flows.candidate_passed(
                db_session, job_id=job.id, attempt=job.attempt, staged=_staged(store),
                store=store, signer=signer, report=good, metrics=good["summary"],
                forgotten=_forgotten(db_session, job.id))
            seeded.requests[label], seeded.jobs[label] = done.id, job.id
        # An operator's upload, newer than every erasure: production may move to it.
        registry.add_version(db_session, model=fashion, staged=_staged(store), store=store,
                             actor="key:seed", status=VersionStatus.candidate)

        # The running job, mid-way through unlearning.
        running = _submit(db_session, acme, secret_key,
                          SubjectRequest(kind="subject", subject_ref="customer-3", model=MODEL))
        job = _next_job(db_session)
        flows.report_progress(db_session, job_id=job.id, attempt=job.attempt,
                              phase="match: epoch 2/5", step=40, total=100,
                              metrics={"loss": 0.412, "forget_accuracy": 0.62})
        seeded.requests["processing"], seeded.jobs["running"] = running.id, job.id

        # Queued requests with deadlines in every colour band, one overdue.
        queued: list[tuple[str, str | None, Principal, int]] = [
            ("overdue", "customer-4", acme, 32), ("red", "customer-5", globex, 27),
            ("amber", "customer-6", acme, 22), ("green", "customer-7", globex, 5),
            ("queued", "customer-8", acme, 0), ("class", None, globex, 1)]
        for label, subject_ref, client, age_days in queued:
            body: Any = (ClassRequest(kind="class", class_label=3, model=MODEL)
                         if subject_ref is None else
                         SubjectRequest(kind="subject", subject_ref=subject_ref, model=MODEL))
            request = _submit(db_session, client, secret_key, body)
            received = now - timedelta(days=age_days, hours=1)
            db_session.execute(update(DeletionRequest).where(DeletionRequest.id == request.id)
                               .values(received_at=received,
                                       due_at=received + timedelta(days=30)))
            seeded.requests[label] = request.id

        nothing = _submit(db_session, globex, secret_key,
                          SubjectRequest(kind="subject", subject_ref="nobody-we-know"))
        seeded.requests["no_data"] = nothing.id
        canceled = _submit(db_session, acme, secret_key,
                           SubjectRequest(kind="subject", subject_ref="customer-9", model=MODEL))
        lifecycle.cancel(db_session, request=canceled, actor="key:seed")
        seeded.requests["canceled"] = canceled.id
        held = _submit(db_session, acme, secret_key,
                       SubjectRequest(kind="subject", subject_ref="customer-10",
                                      model=APPROVAL_MODEL))
        seeded.requests["awaiting_approval"] = held.id

        # A newer reference set being built for fashion-cnn (3 of 8 models stored), and one
        # that failed for digits-mlp, whose policy then requires references: it has none.
        seeded.reference_sets["running"] = _reference_set(
            db_session, fashion, stored=3, finish=False, worker="gpu-worker-2:4343").id
        digits = registry.get(db_session, name=APPROVAL_MODEL)
        failing = _reference_set(db_session, digits, stored=1, finish=False,
                                 worker="gpu-worker-2:4343")
        references.fail(db_session, set_id=failing.id,
                        reason="reference 2/8: CUDA out of memory")
        seeded.reference_sets["failed"] = failing.id
        digits.policy = Policy.model_validate({**digits.policy, "verification": {
            **digits.policy["verification"], "require_references": True}}).model_dump(
            mode="json")

        # Spread the finished requests' intake over the last weeks for the per-day chart.
        for index, label in enumerate(("failed", "completed", "completed-2", "no_data",
                                       "canceled")):
            db_session.execute(update(DeletionRequest)
                               .where(DeletionRequest.id == seeded.requests[label])
                               .values(received_at=now - timedelta(days=3 + 4 * index)))
        assert db_session.scalar(select(DeletionRequest.status).where(
            DeletionRequest.id == running.id)) == RequestStatus.processing.value
    return seeded
