"""Workers and the broker failing with work in flight: real uvicorn, Celery worker and beat
processes on PostgreSQL and a private Redis, jobs that really unlearn (tests/worker's world).

- A worker SIGKILLed inside the publish transaction, at its most delicate point: the new
  weights already moved to their final name, the version row, alias move and completions not
  yet committed. (tests/worker/test_end_to_end.py kills one mid-unlearning.) The kill is
  placed without a hook in the product: the test holds a row lock the publish transaction
  needs, waits until PostgreSQL shows the worker waiting on it, checks the file is in place,
  and kills. After the sweeper's redelivery: one published version, every weights file under
  its final name matching the sha256 its row records (no orphan, nothing half-written), each
  request completed and certified exactly once.
- Redis killed (it keeps nothing on disk) with a job's message queued and no job worker to
  take it (only the maintenance worker that runs the batcher and sweeper), then started
  again empty: the sweeper sends the job again and everything completes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import text

from app.core.config import Settings
from app.core.db import make_engine
from tests.reliability.servers import PrivateRedis
from tests.worker.conftest import MODEL, cached_world
from tests.worker.services import Services
from tests.worker.test_end_to_end import (
    FAST_TICKS,
    URL,
    all_completed,
    copy_store,
    make_keys,
    register,
    submit,
)
from unlearning.data.catalog import MANIFEST_NAME
from worker import maintenance
from worker.celery_app import MAINTENANCE_QUEUE
from worker.context import WorkerContext
from worker.world import World, subjects_in

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.redis,
              pytest.mark.slow]

SUBJECTS = 12  # enough samples for the population attack (tests/worker/test_pipeline.py)


@pytest.fixture(scope="module")
def world() -> World:
    return cached_world()


@pytest.fixture
def deployment(postgres_url: str, private_redis: PrivateRedis, tmp_path: Path,
               world: World) -> Iterator[tuple[Services, Path]]:
    data_dir = tmp_path / "data"
    services = Services({**FAST_TICKS, "LETHE_DATABASE_URL": postgres_url,
                         "LETHE_BROKER_URL": private_redis.url,
                         "LETHE_DATA_DIR": str(data_dir)}, tmp_path)
    copy_store(world, data_dir)
    try:
        yield services, data_dir
    finally:
        services.stop_all()


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def holding(url: str, lock: str) -> Iterator[psycopg.Connection[Any]]:
    """A transaction that holds ``lock`` (a SELECT ... FOR UPDATE) until the block ends."""
    with psycopg.connect(libpq(url)) as connection:
        connection.execute(lock)
        yield connection
        connection.rollback()


def waiting_on_lock(url: str, table: str) -> bool:
    """Whether another session waits for a row lock while touching ``table``."""
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()").fetchall()
    return any(table in query for (query,) in rows)


def final_files(data_dir: Path) -> dict[str, str]:
    """Weights under a final name in the artifact store (staging left out) -> their sha256."""
    artifacts = data_dir / "artifacts"
    return {path.relative_to(artifacts).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in artifacts.rglob("*") if path.is_file()
            and path.relative_to(artifacts).parts[0] != ".staging"}


def maintenance_an_hour_later(database_url: str, data_dir: Path) -> dict[str, int]:
    """The beat's maintenance pass, run here, after files older than its age limit."""
    an_hour_ago = time.time() - maintenance.STAGING_MAX_AGE - 60
    for path in (data_dir / "artifacts").rglob("*"):
        if path.is_file():
            os.utime(path, (an_hour_ago, an_hour_ago))
    settings = Settings(data_dir=data_dir, database_url=database_url, secret_key="e2e-secret")
    context = WorkerContext(settings)
    try:
        return maintenance.run_all(context)
    finally:
        context.engine.dispose()


def check_published_once(database_url: str, data_dir: Path, ids: list[str]) -> None:
    """One published version (2, from the base 1); every file under a final name in the
    artifact store is a version's, with the sha256 its row records; each request completed,
    audited as completed and certified exactly once."""
    engine = make_engine(database_url)
    with engine.connect() as connection:
        versions = connection.execute(text(
            "SELECT number, status, artifact_uri, sha256 FROM model_versions "
            "ORDER BY number")).all()
        completed: dict[str, int] = dict(connection.execute(text(
            "SELECT entity_id, count(*) FROM audit_events WHERE action = "
            "'deletion_request.completed' GROUP BY entity_id")).all())
        certificates: dict[str, int] = dict(connection.execute(text(
            "SELECT request_id, count(*) FROM certificates GROUP BY request_id")).all())
        statuses: dict[str, str] = dict(connection.execute(text(
            "SELECT id, status FROM deletion_requests")).all())
    engine.dispose()
    # The base is superseded, and purged at once (FAST_POLICY's grace period is 0 days).
    assert [(n, s) for n, s, _, _ in versions] == [(1, "purged"), (2, "published")]
    recorded = {uri: sha for _, status, uri, sha in versions if uri and status != "purged"}
    on_disk = final_files(data_dir)
    assert on_disk == recorded, f"files {on_disk} != rows {recorded}"
    assert {i: statuses[i] for i in ids} == dict.fromkeys(ids, "completed")
    assert completed == dict.fromkeys(ids, 1), completed
    assert certificates == dict.fromkeys(ids, 1), certificates


def test_a_worker_killed_inside_the_publish_transaction_publishes_once(
        deployment: tuple[Services, Path], postgres_url: str, world: World) -> None:
    services, data_dir = deployment
    services.start_api()
    services.start("worker", "worker")
    services.start("beat", "beat")
    headers = make_keys(postgres_url)
    store = data_dir / "datasets" / world.store
    with httpx.Client(base_url=services.base_url, timeout=60) as api:
        register(api, headers["operator"], world, store)
        # Publishing moves `production`: its row is what the transaction will wait for.
        with holding(postgres_url, "SELECT * FROM model_aliases FOR UPDATE"):
            ids = submit(api, headers["requester"], subjects_in(store, SUBJECTS))
            services.wait_until(lambda: waiting_on_lock(postgres_url, "model_aliases"),
                                timeout=900, what="the publish transaction to wait on the lock",
                                every=0.5)
            moved = sorted((data_dir / "artifacts" / MODEL).glob("v2-*.safetensors"))
            assert moved, "the new weights are not under their final name yet"
            services.kill("worker")  # SIGKILL, the whole process group
        jobs = api.get("/v1/jobs", headers=headers["operator"]).json()["items"]
        assert [j["status"] for j in jobs] == ["verifying"], jobs  # nothing committed
        services.start("worker-2", "worker")
        services.wait_until(lambda: all_completed(api, headers["requester"], ids),
                            timeout=900, what="the requests to complete after the kill",
                            every=2)
        job = api.get(f"/v1/jobs/{jobs[0]['id']}", headers=headers["operator"]).json()
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        assert job["result_version"] == 2
    services.stop_all()
    # The first delivery's weights stay under their final name without a row (unless the
    # retry happened to write the same bytes); the next maintenance pass past the age limit
    # deletes them.
    left = final_files(data_dir)
    cleared = maintenance_an_hour_later(postgres_url, data_dir)
    print(f"\nkilled with {moved[-1].name} moved in; files after the retry: {sorted(left)}; "
          f"maintenance: {cleared}")
    check_published_once(postgres_url, data_dir, ids)


def holdout_keys(store: Path, n: int) -> list[str]:
    """Sample keys of the holdout split: data the model never trained on."""
    with (store / MANIFEST_NAME).open() as handle:
        rows = (json.loads(line) for line in handle)
        return [row["sample_key"] for row in rows if row["split"] == "holdout"][:n]


def test_redis_restarted_empty_with_a_job_queued_everything_completes(
        deployment: tuple[Services, Path], postgres_url: str, private_redis: PrivateRedis,
        world: World) -> None:
    # Requests for holdout samples: their job tombstones them and completes without a new
    # version (the model never saw them), so the test is about delivery, not unlearning time.
    services, data_dir = deployment
    services.start_api()
    services.start("beat", "beat")
    # the batcher and sweeper run as maintenance tasks: a worker for those, none for jobs yet
    services.start("maintenance", "worker", "--queues", MAINTENANCE_QUEUE)
    headers = make_keys(postgres_url)
    store = data_dir / "datasets" / world.store
    keys = holdout_keys(store, 8)
    requester = headers["requester"]

    def request(key: str) -> str:
        response = api.post(URL, json={"kind": "samples", "sample_keys": [key]},
                            headers=requester)
        assert response.status_code == 202 and response.json()["status"] == "queued"
        return str(response.json()["id"])

    with httpx.Client(base_url=services.base_url, timeout=60) as api:
        register(api, headers["operator"], world, store)
        ids = [request(key) for key in keys[:5]]
        services.wait_until(lambda: private_redis.queued("unlearning") == 1, timeout=120,
                            what="the job's message to be queued in Redis", every=0.5)
        private_redis.kill()  # the queued message is gone with it
        time.sleep(3)  # beat's ticks meet a dead broker meanwhile
        private_redis.start()
        assert private_redis.queued("unlearning") == 0
        late = [request(key) for key in keys[5:]]  # intake never needed the broker
        services.start("worker", "worker")
        services.wait_until(lambda: all_completed(api, requester, ids + late),
                            timeout=600, what="every request to complete after the restart",
                            every=2)
        for name in ("api", "beat", "maintenance", "worker"):  # all survived the restart
            assert services.processes[name].poll() is None, services.log(name)[-3000:]
        for request_id in ids + late:
            body = api.get(f"{URL}/{request_id}", headers=requester).json()
            assert body["outcome"] == "forgotten" and body["targets"][0]["version"] == 1
        jobs = api.get("/v1/jobs", headers=headers["operator"]).json()["items"]
    assert sorted(j["status"] for j in jobs) == ["succeeded"] * len(jobs)
    assert len(jobs) == 2  # the lost one, delivered again, and the late requests' own
