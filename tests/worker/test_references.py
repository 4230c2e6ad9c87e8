"""Reference statistics through the whole service: a version upload queues a reference job,
requests wait for it with a reason, a delivery killed mid-way resumes without duplicates, the
gate reads the statistics (per-sample evidence in the report and the certificate), a requester
sees only its own client's rows, and erasing a sample erases its statistics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from app.auth import service as keys
from app.auth.models import Role
from app.core.db import utcnow
from app.datasets.models import Sample
from app.jobs import scheduled
from app.references import service as references
from app.references.models import ReferenceSet, ReferenceStatistic
from tests.worker.conftest import FAST_POLICY, MODEL, ORIGINAL_RECIPE, Deployment, make_deployment
from worker import pipeline
from worker import references as reference_job
from worker.world import World

URL = "/v1/deletion-requests"
# Short reference trainings keep the test quick; the statistics are real all the same.
POLICY: dict[str, Any] = {
    **FAST_POLICY, "verification": {"references": 8},
    "training_recipe": ORIGINAL_RECIPE.with_(epochs=6).to_dict()}


@pytest.fixture
def referenced(sqlite_url: str, tmp_path: Path, world: World) -> Iterator[Deployment]:
    yield from make_deployment(sqlite_url, tmp_path / "data", world, POLICY)


def _sets(deployment: Deployment) -> list[dict[str, Any]]:
    response = deployment.client.get(f"/v1/models/{MODEL}/references",
                                     headers=deployment.auditor)
    assert response.status_code == 200, response.text
    return response.json()["items"]


class Killed(BaseException):
    """The worker process dying between two reference models."""


def test_reference_job_gates_requests_and_backs_certificates(
        referenced: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, client = referenced, referenced.client
    [queued] = _sets(deployment)  # uploading the original queued a reference job
    assert queued["status"] == "queued" and queued["references"] == 8

    # Requests wait, with the reason on their target, while no reference set is ready.
    with deployment.worker.session() as db_session:
        other = {"Authorization": "Bearer " + keys.create(
            db_session, role=Role.requester, client_id="globex")[1]}
    subjects = deployment.subjects(4)
    ids = []
    for subject, headers in zip(subjects, [deployment.requester, other] * 2, strict=True):
        response = client.post(URL, json={"kind": "subject", "subject_ref": subject},
                               headers=headers)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    body = client.get(f"{URL}/{ids[0]}", headers=deployment.requester).json()
    assert "waiting for reference statistics" in body["targets"][0]["waiting_for"]
    ctx = deployment.worker
    with ctx.session() as db_session:
        assert scheduled.plan_batches(db_session) == []

    # A delivery dies after storing 3 of the 8 models; the sweeper requeues it, the next
    # delivery skips what was stored and adds no duplicate.
    real_store = references.store_reference
    stored: list[int] = []

    def dying_store(*args: Any, **kwargs: Any) -> None:
        if len(stored) == 3:
            raise Killed
        real_store(*args, **kwargs)
        stored.append(kwargs["index"])

    monkeypatch.setattr(references, "store_reference", dying_store)
    with pytest.raises(Killed):
        reference_job.build(ctx, queued["id"])
    monkeypatch.setattr(references, "store_reference", real_store)
    assert _sets(deployment)[0]["completed"] == 3
    assert reference_job.build(ctx, queued["id"]) == "skipped"  # alive elsewhere, it seems
    with ctx.session() as db_session:
        db_session.execute(update(ReferenceSet).values(heartbeat_at=utcnow().replace(year=2000)))
        db_session.commit()
        assert references.requeue_lost(db_session, heartbeat_timeout=30) == [queued["id"]]
    assert reference_job.build(ctx, queued["id"]) == "ready"
    [ready] = _sets(deployment)
    assert ready["status"] == "ready" and ready["completed"] == 8 and ready["attempt"] == 2
    assert len(ready["reference_seconds"]) == 8 and ready["cost_seconds"] > 0
    n_train, n_holdout = ready["n_train"], ready["n_holdout"]
    # each pair keeps every training sample once (from the model that left it out) and splits
    # the holdout between its two models the same way
    assert ready["statistics"] == 4 * (n_train + n_holdout)
    assert not list((deployment.settings.data_dir).rglob("*reference*"))  # no weights kept

    # Now the batch runs, and the gate reads the references.
    body = client.get(f"{URL}/{ids[0]}", headers=deployment.requester).json()
    assert body["targets"][0]["waiting_for"] is None
    with ctx.session() as db_session:
        created = [job.id for job in scheduled.plan_batches(db_session)]
    assert len(created) == 1
    handed: list[Any] = []
    real_load = pipeline.load_references

    def recorded_load(db_session: Any, model: Any, data: Any) -> Any:
        phi_before = {(sample_id, index): phi for sample_id, index, phi in db_session.execute(
            select(ReferenceStatistic.sample_id, ReferenceStatistic.reference_index,
                   ReferenceStatistic.phi))}  # before the job erases the forgotten ones'
        loaded = real_load(db_session, model, data)
        handed.append((loaded[1], data.forget_ids, data.unseen_ids, phi_before))
        return loaded

    monkeypatch.setattr(pipeline, "load_references", recorded_load)
    assert pipeline.run(ctx, created[0]) == "published"
    # The method was handed the method half (references 4 to 7) for its forget and unseen
    # samples, never the gate's.
    [(method_half, forget_ids, unseen_ids, phi_before)] = handed
    for values, sample_ids in ((method_half.forget, forget_ids),
                               (method_half.unseen, unseen_ids)):
        assert values.shape == (4, len(sample_ids)) and len(sample_ids) > 0
        for row in range(4):
            for column, sample_id in enumerate(sample_ids):
                expected = phi_before.get((sample_id, 4 + row))
                assert (expected is None and values[row, column] != values[row, column]) or \
                    values[row, column] == expected
        assert (~np.isnan(values)).sum(axis=0).min() == 2  # two OUT values per sample
    versions = client.get(f"/v1/models/{MODEL}/versions", headers=deployment.operator).json()
    report = versions[-1]["verification_report"]
    assert report["evidence"] == "per-sample"
    # the outcome follows the tensors, never calls unchanged weights unlearned
    run = report["run"]
    changed = run["parent_tensor_sha256"] != run["tensor_sha256"]
    assert run["weights_changed"] is changed
    assert report["outcome"] == ("unlearned" if changed else "unchanged")
    # the policy's min_steps (10) apply even when the subjects already look unseen
    assert changed and run["steps"] >= 10
    rows = report["per_sample"]["requests"]
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert all(r["n_testable"] == r["n"] > 0 for r in rows)
    assert report["per_sample"]["references"] == 2  # OUT references per sample, gate half
    assert all(r["p_before"] is not None and r["detectable_shift"] > 0 for r in rows)

    # A requester sees its own client's rows only.
    mine = client.get(f"/v1/models/{MODEL}/versions/{versions[-1]['number']}",
                      headers=deployment.requester).json()["verification_report"]
    assert sorted(r["request_id"] for r in mine["per_sample"]["requests"]) == sorted(ids[0::2])

    # The certificate states the per-sample evidence for its own request, in figures and words.
    entry = client.get(f"{URL}/{ids[0]}/certificate", headers=deployment.requester
                       ).json()["certificate"]["models"][0]
    assert entry["evidence"] == "per-sample" and entry["outcome"] == report["outcome"]
    assert entry["weights_changed"] is changed and entry["method_steps"] == run["steps"]
    assert entry["tensor_sha256"] == run["tensor_sha256"]
    assert ("changed the weights" if changed else "it was not unlearned") in entry["statement"]
    own = next(r for r in rows if r["request_id"] == ids[0])
    assert entry["per_sample"]["p_value"] == own["p_value"]
    assert "Per-sample evidence" in entry["statement"] and ids[1] not in str(entry)

    # The forgotten samples' statistics went with their tombstones.
    with ctx.session() as db_session:
        tombstoned = list(db_session.scalars(select(Sample.id).where(
            Sample.forgotten_at.is_not(None))))
        assert tombstoned
        left = db_session.scalar(select(func.count()).select_from(ReferenceStatistic).where(
            ReferenceStatistic.sample_id.in_(tombstoned)))
        assert left == 0
        assert db_session.execute(
            select(func.count()).select_from(ReferenceStatistic)).scalar_one() > 0


def test_reference_requests_are_checked_at_the_door(referenced: Deployment) -> None:
    client, url = referenced.client, f"/v1/models/{MODEL}/references"
    for k in (0, 2, 10, 10_000):
        response = client.post(url, json={"references": k}, headers=referenced.operator)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    assert client.post(url, json={}, headers=referenced.requester).status_code == 403
    assert client.get(url, headers=referenced.requester).status_code == 403
    assert client.post("/v1/models/no-such-model/references", json={},
                       headers=referenced.operator).status_code == 404
    # one active set per model: asking again returns it
    again = client.post(url, json={"references": 12}, headers=referenced.operator)
    assert again.status_code == 200 and again.json()["id"] == _sets(referenced)[0]["id"]
    bad = client.put(f"/v1/models/{MODEL}/policy", headers=referenced.operator,
                     json={"policy": {**POLICY, "verification": {"references": 10_000}}})
    assert bad.status_code == 422


def test_references_cli_reports_state(referenced: Deployment,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import main

    monkeypatch.setenv("LETHE_DATA_DIR", str(referenced.settings.data_dir))
    monkeypatch.setenv("LETHE_DATABASE_URL", referenced.settings.resolved_database_url)
    monkeypatch.setenv("LETHE_SECRET_KEY", "test")
    from app.core.config import get_settings
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["references", "status", MODEL])
        assert result.exit_code == 0, result.output
        assert "queued, 0/8 models" in result.output
        result = CliRunner().invoke(main, ["references", "build", MODEL, "--references", "6"])
        assert result.exit_code != 0 and "multiple of 4" in result.output
        result = CliRunner().invoke(main, ["references", "status", "no-such-model"])
        assert result.exit_code != 0 and "does not exist" in result.output
    finally:
        get_settings.cache_clear()
