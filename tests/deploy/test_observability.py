"""Metrics, JSON logs with request ids, and readiness: /metrics reads the domain's state
from the database, merges several uvicorn workers' counts, and a request id follows a request
from the API into a Celery task."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models_registry import service as registry
from app.observability import metrics
from app.observability.logs import make_handler
from app.observability.middleware import ObservabilityMiddleware
from app.observability.request_id import get_request_id, request_id_context
from app.references import service as references
from tests.conftest import REDIS_URL, service_unavailable
from tests.dashboard.conftest import make_world

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return scrape[(name, frozenset(labels.items()))]


def test_metrics_report_the_domain_state_from_the_database(database_url: str,
                                                           tmp_path: Path) -> None:
    world = make_world(database_url, tmp_path / "data")
    try:
        with TestClient(world.app) as client:
            response = client.get("/metrics")
    finally:
        world.app.state.engine.dispose()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    scrape = samples(response.text)
    assert value(scrape, "lethe_deletion_requests", status="queued") == 6
    assert value(scrape, "lethe_deletion_requests", status="completed") == 2
    assert value(scrape, "lethe_deletion_requests", status="verifying") == 0
    assert value(scrape, "lethe_deletion_requests_received_total") == 13
    assert value(scrape, "lethe_deletion_requests_overdue") == 1
    assert value(scrape, "lethe_deletion_requests_due_soon") == 1  # the one with 3 days left
    assert value(scrape, "lethe_queue_depth", model="fashion-cnn") == 6
    assert value(scrape, "lethe_queue_depth", model="digits-mlp") == 0  # held for approval
    assert value(scrape, "lethe_jobs_active", status="running") == 1
    assert value(scrape, "lethe_jobs_finished_total", model="fashion-cnn", status="failed") == 1
    assert value(scrape, "lethe_jobs_finished_total", model="fashion-cnn",
                 status="succeeded") == 2
    assert value(scrape, "lethe_job_duration_seconds_count", model="fashion-cnn",
                 status="succeeded") == 2
    assert value(scrape, "lethe_job_duration_seconds_bucket", model="fashion-cnn",
                 status="succeeded", le="+Inf") == 2
    assert value(scrape, "lethe_model_production_version", model="fashion-cnn") == 4
    assert value(scrape, "lethe_model_mia_accuracy", model="fashion-cnn") == 0.51
    assert value(scrape, "lethe_model_test_accuracy", model="fashion-cnn") == 0.906
    assert value(scrape, "lethe_model_verification_passed", model="fashion-cnn") == 1
    assert ("lethe_model_mia_accuracy", frozenset({("model", "digits-mlp")})) not in scrape
    # Reference sets: fashion-cnn's ready one (8 models, 30 + 30.5 + ... + 33.5 s) and a newer
    # one running with 3 models stored; digits-mlp's failed, and its policy requires one.
    for status, count in (("queued", 0), ("running", 1), ("ready", 1), ("failed", 1),
                          ("superseded", 0)):
        assert value(scrape, "lethe_reference_sets", status=status) == count, status
    assert value(scrape, "lethe_reference_models_completed", model="fashion-cnn") == 3
    assert value(scrape, "lethe_reference_models_completed", model="digits-mlp") == 0
    assert value(scrape, "lethe_reference_seconds", model="fashion-cnn") == 254.0
    assert ("lethe_reference_seconds", frozenset({("model", "digits-mlp")})) not in scrape
    assert value(scrape, "lethe_models_without_references") == 1
    assert value(scrape, "lethe_metrics_database_up") == 1


def test_reference_metrics_follow_a_set_becoming_ready(database_url: str, tmp_path: Path
                                                       ) -> None:
    world = make_world(database_url, tmp_path / "data")
    try:
        with session_scope(world.app.state.sessionmaker) as db_session:
            references.finish(db_session, set_id=world.seeded.reference_sets["running"])
            digits = registry.get(db_session, name="digits-mlp")
            queued, _ = references.request_build(db_session, model=digits, actor="key:test")
        with TestClient(world.app) as client:
            waiting = samples(client.get("/metrics").text)
            with session_scope(world.app.state.sessionmaker) as db_session:
                references.finish(db_session, set_id=queued.id)
            ready = samples(client.get("/metrics").text)
    finally:
        world.app.state.engine.dispose()
    # The running set is ready now, the older one superseded: the cost is the new set's
    # (30 + 30.5 + 31 s); digits-mlp's new set is queued with no model yet: it still waits.
    for status, count in (("queued", 1), ("running", 0), ("ready", 1), ("failed", 1),
                          ("superseded", 1)):
        assert value(waiting, "lethe_reference_sets", status=status) == count, status
    assert value(waiting, "lethe_reference_seconds", model="fashion-cnn") == 91.5
    assert value(waiting, "lethe_reference_models_completed", model="fashion-cnn") == 3
    assert ("lethe_reference_seconds", frozenset({("model", "digits-mlp")})) not in waiting
    assert value(waiting, "lethe_models_without_references") == 1
    # Once digits-mlp has a ready set, no model waits.
    assert value(ready, "lethe_reference_sets", status="ready") == 2
    assert value(ready, "lethe_reference_seconds", model="digits-mlp") == 0
    assert value(ready, "lethe_models_without_references") == 0


def test_a_scrape_still_answers_when_the_database_is_down(tmp_path: Path) -> None:
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        scrape = samples(metrics.render(make_sessionmaker(engine)).decode())
    finally:
        engine.dispose()
    assert value(scrape, "lethe_metrics_database_up") == 0
    assert not any(name == "lethe_deletion_requests" for name, _ in scrape)


def test_http_and_predict_metrics_label_routes_not_raw_paths(sqlite_url: str,
                                                             tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=sqlite_url,
                              secret_key="x", broker_url="memory://"))
    route = frozenset({("method", "GET"), ("route", "/v1/deletion-requests/{request_id}"),
                       ("status", "401")})
    with TestClient(app) as client:
        before = samples(client.get("/metrics").text).get(("lethe_http_requests_total", route),
                                                          0.0)
        for n in range(3):
            client.get(f"/v1/deletion-requests/id-{n}")
        metrics.observe_predict("fashion-cnn", 0.004, samples=16)
        scrape = samples(client.get("/metrics").text)
    app.state.engine.dispose()
    assert scrape[("lethe_http_requests_total", route)] == before + 3
    assert not any("id-1" in str(labels) for _, labels in scrape)
    assert value(scrape, "lethe_predict_samples_total", model="fashion-cnn") >= 16
    assert value(scrape, "lethe_predict_latency_seconds_bucket", model="fashion-cnn",
                 outcome="ok", le="0.005") >= 1


# ---- request ids and JSON logs ------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def test_request_id_is_echoed_made_when_missing_and_reaches_every_log_line(
        json_log: io.StringIO) -> None:
    app = FastAPI()
    app.add_middleware(ObservabilityMiddleware)

    @app.get("/work")
    def work() -> dict[str, str | None]:  # a sync route: runs on the threadpool
        logging.getLogger("lethe.test").info("working", extra={"step": 1})
        return {"seen": get_request_id()}

    with TestClient(app) as client:
        given = client.get("/work", headers={"X-Request-ID": "intake-42"})
        made = client.get("/work")
        forged = client.get("/work", headers={"X-Request-ID": "x forged\tline " * 20})
    assert given.headers["x-request-id"] == "intake-42" == given.json()["seen"]
    assert len(made.headers["x-request-id"]) == 32 == len(made.json()["seen"])
    assert len(forged.headers["x-request-id"]) == 32  # not the caller's text
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "intake-42"]
    assert {line["logger"] for line in mine} == {"lethe.test", "lethe.access"}
    work_line = next(line for line in mine if line["logger"] == "lethe.test")
    assert work_line["message"] == "working" and work_line["step"] == 1
    access = next(line for line in mine if line["logger"] == "lethe.access")
    assert access["status"] == 200 and access["route"] == "/work"
    assert access["duration_ms"] >= 0


def test_request_id_follows_a_task_into_the_worker() -> None:
    from celery import Celery, Task
    from celery.contrib.testing.worker import start_worker

    from app.observability.celery_context import install_celery_request_ids

    install_celery_request_ids()
    celery_app = Celery("lethe-test", broker="memory://", backend="cache+memory://")
    celery_app.conf.update(task_default_queue="test")
    seen: list[tuple[str | None, str]] = []

    @celery_app.task(name="test.record", bind=True)
    def record(self: Task) -> None:
        seen.append((get_request_id(), self.request.id))

    with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        with request_id_context("intake-42"):
            record.delay()
        stray = record.delay()
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen[0][0] == "intake-42"
    assert seen[1] == (stray.id, stray.id)  # sent with no id bound: its own task id
    assert get_request_id() is None


def test_celery_processes_log_json_through_our_handler() -> None:
    from celery import signals

    from app.observability.celery_context import install_celery_logging

    root = logging.getLogger()
    before = list(root.handlers), root.level
    install_celery_logging("WARNING", "json")
    try:
        answers = signals.setup_logging.send(sender=None, loglevel="INFO", logfile=None,
                                             format="", colorize=False)
        assert answers  # a receiver answered: Celery leaves logging to it
        handler = next(h for h in root.handlers if h.get_name() == "lethe")
        assert type(handler.formatter).__name__ == "JsonFormatter"
        assert root.level == logging.WARNING
    finally:
        signals.setup_logging.disconnect(dispatch_uid="lethe.logging")
        root.handlers[:] = before[0]
        root.setLevel(before[1])


# ---- several uvicorn workers ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_uvicorn_workers_report_one_merged_count_and_log_json(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "LETHE_DATA_DIR": str(tmp_path / "data"),
           "LETHE_DATABASE_URL": f"sqlite:///{tmp_path / 'lethe.db'}",
           "LETHE_BROKER_URL": "memory://", "LETHE_SECRET_KEY": "x"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    lethe = Path(sys.executable).with_name("lethe")
    server = subprocess.Popen([str(lethe), "serve", "--port", str(port), "--workers", "2"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.3)
        route = frozenset({("method", "GET"), ("route", "/readyz"), ("status", "200")})
        def probe(n: int) -> tuple[int, str]:  # a new connection each, several at once
            response = httpx.get(f"{base}/readyz", headers={"X-Request-ID": f"probe-{n}"},
                                 timeout=30)
            return response.status_code, response.text

        def writers() -> set[str]:  # the pids that have written metrics (one file each)
            return {p.stem.split("_")[-1]
                    for p in (tmp_path / "data" / "prometheus").glob("*.db")}

        # Rounds of 30 until both workers have answered: which worker accepts a connection is
        # the kernel's choice, and on a loaded machine (one CI run) the second worker was
        # still importing while the first took all 30.
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 60
        with ThreadPoolExecutor(max_workers=6) as pool:
            while not answers or (len(writers()) < 2 and time.monotonic() < deadline):
                answers += pool.map(probe, range(len(answers), len(answers) + 30))
        # a 503 names the dependency that failed (this is how kombu's lazy-import race in
        # the broker ping was found: test_errors' concurrent readiness test)
        assert [status for status, _ in answers] == [200] * len(answers), \
            [body for status, body in answers if status != 200]
        counts = [samples(httpx.get(f"{base}/metrics").text)[("lethe_http_requests_total",
                                                              route)] for _ in range(6)]
        files = writers()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    # every worker answering a scrape sees the same total
    assert counts == [float(len(answers))] * 6
    assert len(files) >= 2, files  # and the count really came from two processes
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    probes = [line for line in lines if str(line.get("request_id", "")).startswith("probe-")]
    assert len(probes) == len(answers) and all(line["logger"] == "lethe.access"
                                               for line in probes)
    assert any(line["logger"].startswith("uvicorn") for line in lines)


# ---- readiness -------------------------------------------------------------------------------


def _readyz(sqlite_url: str, tmp_path: Path, broker_url: str | None) -> httpx.Response:
    app = create_app(Settings(data_dir=tmp_path / "d", database_url=sqlite_url,
                              secret_key="x", broker_url=broker_url))
    with TestClient(app) as client:
        response = client.get("/readyz")
    app.state.engine.dispose()
    return response


def test_not_ready_while_the_broker_is_down(sqlite_url: str, tmp_path: Path) -> None:
    response = _readyz(sqlite_url, tmp_path, "redis://:secret@127.0.0.1:1/0")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("error: ")
    assert "secret" not in response.text


def test_ready_with_the_embedded_broker_on_its_unix_socket(sqlite_url: str, tmp_path: Path
                                                           ) -> None:
    from worker.embedded_broker import EmbeddedBroker

    settings = Settings(data_dir=tmp_path / "d")
    broker = EmbeddedBroker(settings.embedded_broker_socket)
    down = _readyz(sqlite_url, tmp_path, None)  # the default: redis+socket in the data dir
    assert down.status_code == 503 and down.json()["checks"]["broker"].startswith("error")
    broker.start()
    try:
        up = _readyz(sqlite_url, tmp_path, None)
    finally:
        broker.stop()
    assert up.status_code == 200, up.text
    assert up.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.redis
def test_ready_with_the_redis_server(sqlite_url: str, tmp_path: Path) -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        service_unavailable("Redis", exc)
    response = _readyz(sqlite_url, tmp_path, REDIS_URL)
    assert response.status_code == 200 and response.json()["checks"]["broker"] == "ok"
