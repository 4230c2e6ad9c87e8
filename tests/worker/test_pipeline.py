"""The job pipeline in-process (no broker): batch -> claim -> unlearn -> verify -> publish,
the failure path when the method cannot forget, and the erasure afterwards."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from sqlalchemy import select

from app.certificates import signing
from app.core.security import subject_hash
from app.datasets.models import Sample
from app.jobs import flows, scheduled
from app.models_registry.models import VerificationPolicy
from app.observability.logs import RequestIdFilter
from tests.worker.conftest import FAST_POLICY, MODEL, Deployment, make_deployment
from unlearning.data.store import SampleErased, load_samples
from worker import maintenance, pipeline
from worker.world import World

URL = "/v1/deletion-requests"
# Subjects per batch: about 60 training samples, enough for the population attack (>= 50).
BATCH = 12
# A method that changes nothing must be refused: with this many subjects (240 samples) the
# unchanged original's membership signal is unmistakable (KS p < 1e-4); at BATCH's 96 samples
# it sits near the gate's threshold and a refusal would rest on luck.
UNFORGETTABLE = 30


def submit_subjects(deployment: Deployment, subjects: list[str]) -> list[str]:
    ids = []
    for subject in subjects:
        response = deployment.client.post(URL, json={"kind": "subject", "subject_ref": subject},
                                          headers=deployment.requester)
        assert response.json()["status"] == "queued", response.text
        ids.append(response.json()["id"])
    return ids


def run_batches(deployment: Deployment) -> list[str]:
    ctx = deployment.worker
    with ctx.session() as db_session:
        created = [job.id for job in scheduled.plan_batches(db_session)]
    return [pipeline.run(ctx, job_id) for job_id in created]


def test_a_batch_of_subject_requests_is_forgotten_verified_published_and_certified(
        database_url: str, tmp_path: Path, world: World) -> None:
    for deployment in make_deployment(database_url, tmp_path / "data", world, FAST_POLICY):
        check_batch_is_forgotten_and_certified(deployment)


def check_batch_is_forgotten_and_certified(deployment: Deployment) -> None:
    client = deployment.client
    subjects = deployment.subjects(BATCH)
    request_ids = submit_subjects(deployment, subjects)
    assert run_batches(deployment) == ["published"]

    for request_id in request_ids:
        body = client.get(f"{URL}/{request_id}", headers=deployment.requester).json()
        assert body["status"] == "completed" and body["outcome"] == "forgotten"
        assert body["targets"][0]["version"] == 2
    versions = client.get(f"/v1/models/{MODEL}/versions", headers=deployment.operator).json()
    assert [v["status"] for v in versions] == ["superseded", "published"]
    report = versions[1]["verification_report"]
    assert report["passed"] is True
    assert report["summary"]["n_forget"] == deployment.samples_of(subjects, split="train")
    # Forgetting itself is what "passed" asserts (the gate's attacks), and a method that
    # changes nothing is refused below. The two population-attack figures on ~50 samples each
    # carry about +-0.08 of noise, so their order is not asserted (a "base > after" check failed
    # 1 run in ~10); the certificate must carry both, as numbers an auditor can compare.
    summary = report["summary"]
    assert 0.0 <= summary["base_mia_accuracy"] <= 1.0 and 0.0 <= summary["mia_accuracy"] <= 1.0
    assert summary["ks_p_value"] >= VerificationPolicy().min_ks_p_value
    assert client.get(f"/v1/models/{MODEL}", headers=deployment.operator
                      ).json()["aliases"] == {"production": 2}

    # The served model is the new version.
    image = [[[0.0] * 28] * 28]
    predicted = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": image},
                            headers=deployment.requester).json()
    assert predicted["model_version"] == 2

    # Each request has a certificate that verifies against the published key.
    key = signing.load_public_key(client.get("/v1/certificates/public-key").json()["pem"])
    document = client.get(f"{URL}/{request_ids[0]}/certificate",
                          headers=deployment.requester).json()
    assert signing.verify_document(document, key) == (True, "valid")
    entry = document["certificate"]["models"][0]
    assert (entry["model"], entry["version"]) == (MODEL, 2)
    assert entry["weights_sha256"] == versions[1]["sha256"]
    assert entry["verification"]["passed"] is True
    document["certificate"]["models"][0]["version"] = 1
    assert signing.verify_document(document, key)[0] is False


def test_forgotten_samples_are_tombstoned_wiped_and_old_weights_purged(
        deployment: Deployment) -> None:
    subjects = deployment.subjects(BATCH)
    submit_subjects(deployment, subjects)
    assert run_batches(deployment) == ["published"]
    ctx = deployment.worker
    held = deployment.samples_of(subjects)  # every split: holdout and test images too
    assert maintenance.run_all(ctx)["wiped"] == held
    with ctx.session() as db_session:
        forgotten = db_session.scalars(select(Sample).where(Sample.forgotten_at.is_not(None))
                                       ).all()
        assert len(forgotten) == held and all(s.wiped_at is not None for s in forgotten)
        locators = [s.locator for s in forgotten]
    root = deployment.settings.resolved_dataset_dir / deployment.world.store
    with pytest.raises(SampleErased):  # the store refuses to serve them...
        load_samples(root, locators)
    for shard in root.glob("shards/*.safetensors"):  # ...and their bytes are zero on disk
        x = load_file(str(shard))["x"]
        rows = [int(loc.split("#")[1]) for loc in locators if loc.startswith(
            f"shards/{shard.name}")]
        assert rows == [] or int(x[rows].sum()) == 0
    versions = deployment.client.get(f"/v1/models/{MODEL}/versions",
                                     headers=deployment.operator).json()
    assert versions[0]["status"] == "purged"  # v1 still held the erased samples
    assert not any(Path(ctx.settings.resolved_artifact_dir, MODEL).glob("v1-*"))
    # And no alias may ever point at it again.
    rollback = deployment.client.put(f"/v1/models/{MODEL}/aliases/production",
                                     json={"version": 1}, headers=deployment.operator)
    assert rollback.status_code == 409


def test_forgotten_samples_leave_every_later_forget_and_retain_set(
        deployment: Deployment) -> None:
    subjects = deployment.subjects(2 * BATCH)
    submit_subjects(deployment, subjects[:BATCH])
    assert run_batches(deployment) == ["published"]
    # The same subject again: nothing of it is held any more.
    again = deployment.client.post(URL, json={"kind": "subject", "subject_ref": subjects[0]},
                                   headers=deployment.requester).json()
    assert again["outcome"] == "no_data"
    submit_subjects(deployment, subjects[BATCH:])
    ctx = deployment.worker
    with ctx.session() as db_session:
        (job,) = scheduled.plan_batches(db_session)
        claimed = flows.start(db_session, job_id=job.id, worker_host="test", task_id=None,
                              heartbeat_timeout=60)
        assert claimed is not None
        data = pipeline.load_job_data(db_session, ctx, claimed, _dataset(db_session))
        forgotten_ids = set(db_session.scalars(select(Sample.id).where(
            Sample.forgotten_at.is_not(None))))
    assert len(data.forget) == deployment.samples_of(subjects[BATCH:], split="train")
    assert len(forgotten_ids) == deployment.samples_of(subjects[:BATCH])
    assert not forgotten_ids & set(data.forgotten)


def _dataset(db_session: Any) -> Any:
    from app.datasets.models import Dataset

    return db_session.scalars(select(Dataset)).one()


def test_a_method_that_cannot_forget_fails_verification_and_nothing_is_published(
        sqlite_url: str, tmp_path: Path, world: World) -> None:
    policy = {**FAST_POLICY, "method": "ft", "method_config": {"epochs": 1, "lr": 0.0},
              "escalation": {"stronger_attempt": False, "allow_retrain": False}}
    for deployment in make_deployment(sqlite_url, tmp_path / "data", world, policy):
        request_ids = submit_subjects(deployment, deployment.subjects(UNFORGETTABLE))
        assert run_batches(deployment) == ["failed"]
        client = deployment.client
        failed = client.get(f"{URL}/{request_ids[0]}", headers=deployment.requester).json()
        assert failed["status"] == "failed" and failed["outcome"] == "failed"
        assert "verification failed" in failed["targets"][0]["failure_reason"]
        versions = client.get(f"/v1/models/{MODEL}/versions", headers=deployment.operator
                              ).json()
        assert [v["status"] for v in versions] == ["published", "rejected"]
        assert versions[1]["verification_report"]["passed"] is False
        assert client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": 2},
                          headers=deployment.operator).status_code == 409
        served = client.post(f"/v1/models/{MODEL}/predict", json={"inputs": [[[0.0] * 28] * 28]},
                             headers=deployment.requester).json()
        assert served["model_version"] == 1
        assert client.get(f"{URL}/{request_ids[0]}/certificate",
                          headers=deployment.requester).status_code == 404


def test_escalation_reaches_retrain_when_the_method_cannot_forget(
        sqlite_url: str, tmp_path: Path, world: World) -> None:
    policy = {**FAST_POLICY, "method": "ft", "method_config": {"epochs": 1, "lr": 0.0},
              "escalation": {"stronger_attempt": False, "allow_retrain": True}}
    for deployment in make_deployment(sqlite_url, tmp_path / "data", world, policy):
        submit_subjects(deployment, deployment.subjects(UNFORGETTABLE))
        assert run_batches(deployment) == ["published"]
        versions = deployment.client.get(f"/v1/models/{MODEL}/versions",
                                         headers=deployment.operator).json()
        assert [v["status"] for v in versions] == ["superseded", "rejected", "published"]
        assert versions[2]["verification_report"]["method"] == "retrain"
        jobs_list = deployment.client.get("/v1/jobs", headers=deployment.operator).json()
        assert jobs_list["items"][0]["escalation_level"] == 2


def test_a_second_delivery_of_a_finished_job_does_nothing(
        deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    for subject in deployment.subjects(BATCH):
        deployment.client.post(URL, json={"kind": "subject", "subject_ref": subject},
                               headers={**deployment.requester, "X-Request-ID": f"t-{subject}"})
    ctx = deployment.worker
    with ctx.session() as db_session:
        (job,) = scheduled.plan_batches(db_session)
    caplog.handler.addFilter(RequestIdFilter())  # what the JSON log handler stamps
    def versions() -> list[dict[str, object]]:
        return deployment.client.get(f"/v1/models/{MODEL}/versions",
                                     headers=deployment.operator).json()

    with caplog.at_level("INFO", logger="worker.pipeline"):
        assert pipeline.run(ctx, job.id) == "published"
    # Compared with what the first delivery left, not with a count: a first attempt the gate
    # refuses escalates inside that delivery and adds rejected versions of its own.
    after_first = versions()
    assert after_first[-1]["status"] == "published"
    assert pipeline.run(ctx, job.id) == "skipped"
    assert versions() == after_first
    # The worker's log lines for each request carry the X-Request-ID it arrived with.
    traced = {getattr(record, "request_id", None) for record in caplog.records
              if "ended: published" in record.getMessage()}
    assert traced == {f"t-{subject}" for subject in deployment.subjects(BATCH)}


def test_maintenance_deletes_weights_no_version_names_once_they_are_old(
        deployment: Deployment) -> None:
    # What a worker killed inside the publish transaction leaves: the new weights moved to
    # their final name, the row never committed (tests/reliability/test_worker_faults.py).
    ctx = deployment.worker
    folder = ctx.artifacts.root / MODEL
    registered = sorted(folder.glob("*.safetensors"))
    orphan = folder / "v2-0123456789ab.safetensors"
    committing = folder / "v2-ba9876543210.safetensors"
    for path in (orphan, committing):
        path.write_bytes(b"weights")
    two_hours_ago = time.time() - 2 * 3600
    for path in (orphan, *registered):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert maintenance.run_all(ctx)["orphans_cleared"] == 1
    assert not orphan.exists()
    assert committing.exists()  # young: may be a publish still committing
    assert all(path.exists() for path in registered)  # named by their versions


def test_a_sample_lost_from_the_store_fails_only_the_request_that_needs_it(
        deployment: Deployment) -> None:
    """A file lost on disk after the manifest was accepted: the request whose sample it held
    fails with a reason that names the sample; every other request of the batch completes,
    and a lost retain sample is left out of the retain set."""
    subjects = deployment.subjects(BATCH + 1)
    request_ids = submit_subjects(deployment, subjects[:BATCH])
    ctx = deployment.worker
    with ctx.session() as db_session:
        secret = deployment.settings.resolved_secret_key()
        owner, outsider = (subject_hash(secret, subjects[0]),
                           subject_hash(secret, subjects[BATCH]))
        # one image of the first subject's, and a retain sample of a subject nobody asked about
        victim = db_session.scalars(select(Sample).where(
            Sample.subject_hash == owner, Sample.split == "train")).first()
        assert victim is not None
        victim.locator = "lost/forget.png"
        bystander = db_session.scalars(select(Sample).where(
            Sample.split == "train", Sample.subject_hash == outsider)).first()
        assert bystander is not None and outsider != owner
        bystander.locator = "lost/retain.png"
        db_session.commit()
    assert run_batches(deployment) == ["published"]
    statuses = {}
    for request_id in request_ids:
        body = deployment.client.get(f"{URL}/{request_id}", headers=deployment.requester).json()
        statuses[request_id] = (body["status"], body["targets"][0]["failure_reason"])
    failed = {i: reason for i, (status, reason) in statuses.items() if status == "failed"}
    assert len(failed) == 1, statuses
    (reason,) = failed.values()
    assert f"sample {victim.sample_key!r} cannot be read" in reason and "no image" in reason
    assert sum(status == "completed" for status, _ in statuses.values()) == BATCH - 1
    report = deployment.client.get(f"/v1/models/{MODEL}/versions/2",
                                   headers=deployment.operator).json()["verification_report"]
    # the failed subject's training samples were not unlearned (they went back to retain)
    assert report["summary"]["n_forget"] == deployment.samples_of(subjects[1:BATCH],
                                                                  split="train")


# A stopping rule that says "blind" before any step: the batch already looks unseen.
ALREADY_BLIND = {"max_steps": 200, "tolerance": 0.5, "ks_stop_p_value": 0.0}


@pytest.mark.parametrize("publish_unchanged", [False, True])
def test_an_already_indistinguishable_batch_is_unlearned_unless_the_policy_lets_it_stand(
        publish_unchanged: bool, sqlite_url: str, tmp_path: Path, world: World) -> None:
    """By default (``publish_unchanged`` off) the method is applied at least ``min_steps``
    steps even when the subject's handful of samples already looks unseen, so no version is
    published with the weights it replaced; with it on, the job completes on the served
    version and the report says the weights are unchanged."""
    policy = {**FAST_POLICY, "method_config": ALREADY_BLIND, "min_steps": 15,
              "publish_unchanged": publish_unchanged}
    for deployment in make_deployment(sqlite_url, tmp_path / "data", world, policy):
        client = deployment.client
        (request_id,) = submit_subjects(deployment, deployment.subjects(1))
        assert run_batches(deployment) == ["unchanged" if publish_unchanged else "published"]
        body = client.get(f"{URL}/{request_id}", headers=deployment.requester).json()
        assert body["status"] == "completed" and body["outcome"] == "forgotten"
        versions = client.get(f"/v1/models/{MODEL}/versions", headers=deployment.operator
                              ).json()
        job = client.get("/v1/jobs", headers=deployment.operator).json()["items"][0]
        report = client.get(f"/v1/jobs/{job['id']}", headers=deployment.operator
                            ).json()["report"]
        run = report["run"]
        if publish_unchanged:
            assert [v["status"] for v in versions] == ["published"]
            assert body["targets"][0]["version"] == 1
            assert run["steps"] == 0 and run["details"]["stopped"] == "already-blind"
            assert report["outcome"] == "unchanged" and not run["weights_changed"]
        else:
            assert [v["status"] for v in versions] == ["superseded", "published"]
            assert body["targets"][0]["version"] == 2
            assert run["steps"] >= 15 and run["details"]["stopped"] == "blind"
            assert report["outcome"] == "unlearned" and run["weights_changed"]
