"""The mission end to end with real processes: uvicorn + a Celery worker + beat on PostgreSQL
and Redis, and again on the embedded default (`lethe up`: SQLite and the embedded broker).
A request goes in over HTTP and comes out as a published, served version and a certificate
that verifies offline. Also: a worker SIGKILLed mid-unlearning loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import text

from app.auth import service as keys
from app.auth.models import Role
from app.core.db import make_engine, make_sessionmaker, session_scope
from tests.conftest import REDIS_URL, service_unavailable
from tests.worker.conftest import FAST_POLICY, MODEL, ORIGINAL_RECIPE
from tests.worker.services import REPO, Services
from worker.world import World, register_world, subjects_in

pytestmark = pytest.mark.slow
URL = "/v1/deletion-requests"
POLICY: dict[str, Any] = {**FAST_POLICY, "batching": {"max_batch": 50, "max_wait_seconds": 2}}
# On PostgreSQL and Redis the whole path runs with per-sample evidence: the upload queues a
# reference job, beat hands it to the worker, the requests wait for it, the gate reads it.
# Short reference trainings keep it quick; the statistics are real all the same.
REFERENCE_POLICY: dict[str, Any] = {
    **POLICY, "verification": {"references": 8},
    "training_recipe": ORIGINAL_RECIPE.with_(epochs=6).to_dict()}
FAST_TICKS = {"LETHE_BATCH_INTERVAL_SECONDS": "1", "LETHE_SWEEP_INTERVAL_SECONDS": "2",
              "LETHE_HEARTBEAT_SECONDS": "1", "LETHE_HEARTBEAT_TIMEOUT_SECONDS": "8",
              "LETHE_DEVICE": "cpu", "LETHE_SECRET_KEY": "e2e-secret"}


def make_keys(database_url: str) -> dict[str, dict[str, str]]:
    engine = make_engine(database_url)
    headers = {}
    with session_scope(make_sessionmaker(engine)) as db_session:
        for role, client_id in (("operator", "ops"), ("requester", "acme")):
            plain = keys.create(db_session, role=Role(role), client_id=client_id)[1]
            headers[role] = {"Authorization": f"Bearer {plain}"}
    engine.dispose()
    return headers


def register(api: httpx.Client, operator: dict[str, str], world: World, store: Path,
             policy: dict[str, Any] = POLICY) -> None:
    register_world(api, operator, world, store, dataset="fashion", model=MODEL, policy=policy)


def copy_store(world: World, data_dir: Path) -> Path:
    import shutil

    store = data_dir / "datasets" / world.store
    shutil.copytree(world.weights.parent.parent / "datasets" / world.store, store)
    return store


def submit(api: httpx.Client, requester: dict[str, str], subjects: list[str]) -> list[str]:
    ids = []
    for subject in subjects:
        response = api.post(URL, json={"kind": "subject", "subject_ref": subject},
                            headers=requester)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def all_completed(api: httpx.Client, headers: dict[str, str], ids: list[str]) -> bool:
    statuses = [api.get(f"{URL}/{i}", headers=headers).json()["status"] for i in ids]
    assert "failed" not in statuses, statuses
    return all(s == "completed" for s in statuses)


def check_outcome(api: httpx.Client, services: Services, headers: dict[str, dict[str, str]],
                  ids: list[str], tmp_path: Path, *, evidence: str = "population-only") -> None:
    """Completed at the one published version (2, or later if the gate refused a candidate
    first), served as that version, and a certificate that verifies offline with the
    published public key (and fails once tampered with), stating its evidence."""
    requester = headers["requester"]
    published = {body["targets"][0]["version"] for body in (
        api.get(f"{URL}/{request_id}", headers=requester).json() for request_id in ids)}
    assert len(published) == 1 and published.pop() >= 2
    number = api.get(f"{URL}/{ids[0]}", headers=requester).json()["targets"][0]["version"]
    image = [[[0.5] * 28] * 28]
    served = services.wait_until(
        lambda: api.post(f"/v1/models/{MODEL}/predict", json={"inputs": image},
                         headers=requester).json().get("model_version") == number,
        timeout=10, what=f"predict to serve version {number}")
    assert served
    certificate = tmp_path / "certificate.json"
    certificate.write_text(api.get(f"{URL}/{ids[0]}/certificate", headers=requester).text)
    public_key = tmp_path / "public.pem"
    public_key.write_text(api.get("/v1/certificates/public-key").json()["pem"])
    verify = [sys.executable, "-m", "worker.cli", "certificate", "verify", str(certificate),
              "--public-key", str(public_key)]
    result = subprocess.run(verify, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("VALID"), result.stdout
    assert f"evidence: {evidence}" in result.stdout, result.stdout
    tampered = json.loads(certificate.read_text())
    tampered["certificate"]["models"][0]["weights_sha256"] = "0" * 64
    certificate.write_text(json.dumps(tampered))
    assert subprocess.run(verify, capture_output=True, cwd=REPO).returncode == 1


@pytest.fixture
def postgres_redis(postgres_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    try:
        broker = redis.Redis.from_url(REDIS_URL)
        broker.ping()
    except redis.RedisError as error:
        service_unavailable("Redis", error)
    broker.flushdb()
    yield {"LETHE_DATABASE_URL": postgres_url, "LETHE_BROKER_URL": REDIS_URL,
           "LETHE_DATA_DIR": str(tmp_path / "data")}
    broker.flushdb()


def test_request_to_certificate_on_postgres_and_redis(
        postgres_redis: dict[str, str], world: World, tmp_path: Path) -> None:
    services = Services({**FAST_TICKS, **postgres_redis}, tmp_path)
    store = copy_store(world, Path(postgres_redis["LETHE_DATA_DIR"]))
    try:
        services.start_api()
        services.start("worker", "worker")
        services.start("beat", "beat")
        headers = make_keys(postgres_redis["LETHE_DATABASE_URL"])
        with httpx.Client(base_url=services.base_url, timeout=60) as api:
            register(api, headers["operator"], world, store, REFERENCE_POLICY)
            ids = submit(api, headers["requester"], subjects_in(store, 12))
            services.wait_until(lambda: all_completed(api, headers["requester"], ids),
                                timeout=600, what="the requests to complete", every=2)
            [reference] = api.get(f"/v1/models/{MODEL}/references",
                                  headers=headers["operator"]).json()["items"]
            assert reference["status"] == "ready" and reference["completed"] == 8
            check_outcome(api, services, headers, ids, tmp_path, evidence="per-sample")
    finally:
        services.stop_all()


def test_request_to_certificate_on_the_embedded_default(world: World) -> None:
    # A short path: the embedded broker listens on a unix socket inside the data dir.
    data_dir = Path(tempfile.mkdtemp(prefix="lethe-e2e-", dir="/tmp"))
    env = {**FAST_TICKS, "LETHE_DATA_DIR": str(data_dir)}
    for name in ("LETHE_DATABASE_URL", "LETHE_BROKER_URL"):
        env[name] = ""
    services = Services(env, data_dir)
    store = copy_store(world, data_dir)
    database_url = f"sqlite:///{data_dir / 'lethe.db'}"
    try:
        services.start("up", "up", "--port", str(services.port))
        services.wait_until(services._ready, timeout=120, what="`lethe up` to serve")
        headers = make_keys(database_url)
        with httpx.Client(base_url=services.base_url, timeout=60) as api:
            register(api, headers["operator"], world, store)
            ids = submit(api, headers["requester"], subjects_in(store, 12))
            services.wait_until(lambda: all_completed(api, headers["requester"], ids),
                                timeout=600, what="the requests to complete", every=2)
            check_outcome(api, services, headers, ids, data_dir)
    finally:
        services.stop_all()
    assert not (data_dir / "broker" / "redis.sock").exists() or not _broker_answers(data_dir)


def _broker_answers(data_dir: Path) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=str(data_dir / "broker" / "redis.sock"),
                                socket_timeout=1).ping())
    except redis.RedisError:
        return False


def test_a_worker_killed_mid_unlearning_loses_nothing_and_publishes_once(
        postgres_redis: dict[str, str], world: World, tmp_path: Path) -> None:
    services = Services({**FAST_TICKS, **postgres_redis}, tmp_path)
    store = copy_store(world, Path(postgres_redis["LETHE_DATA_DIR"]))
    database_url = postgres_redis["LETHE_DATABASE_URL"]
    try:
        services.start_api()
        services.start("worker", "worker")
        services.start("beat", "beat")
        headers = make_keys(database_url)
        with httpx.Client(base_url=services.base_url, timeout=60) as api:
            register(api, headers["operator"], world, store)
            ids = submit(api, headers["requester"], subjects_in(store, 12))
            operator = headers["operator"]

            def unlearning() -> dict[str, Any] | None:
                items = api.get("/v1/jobs", headers=operator).json()["items"]
                running = [j for j in items if j["status"] == "running" and j["step"] > 0]
                return running[0] if running else None

            job = services.wait_until(unlearning, timeout=300, what="unlearning to start",
                                      every=0.2)
            services.kill("worker")  # SIGKILL, the whole process group, mid-unlearning
            services.start("worker-2", "worker")
            services.wait_until(lambda: all_completed(api, headers["requester"], ids),
                                timeout=600, what="the requests to complete after the kill",
                                every=2)
            final = api.get(f"/v1/jobs/{job['id']}", headers=operator).json()
            assert final["status"] == "succeeded" and final["attempt"] == 2
            versions = api.get(f"/v1/models/{MODEL}/versions", headers=operator).json()
            assert [v["number"] for v in versions if v["status"] == "published"] == [2]
            assert len(versions) == 2
            check_outcome(api, services, headers, ids, tmp_path)
        engine = make_engine(database_url)
        with engine.connect() as connection:
            completed = connection.execute(text(
                "SELECT entity_id, count(*) FROM audit_events WHERE action = "
                "'deletion_request.completed' GROUP BY entity_id")).all()
            certificates = connection.execute(text("SELECT count(*) FROM certificates")).scalar()
        engine.dispose()
        assert sorted(entity for entity, _ in completed) == sorted(ids)
        assert all(count == 1 for _, count in completed) and certificates == len(ids)
    finally:
        services.stop_all()


