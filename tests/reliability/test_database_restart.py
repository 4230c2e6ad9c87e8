"""PostgreSQL crashed and restarted under load, three times: while it is down the API answers
503 problem bodies, promptly (not 500, not a hang); when it is back the API recovers without
a restart, and nothing it acknowledged is lost.

The server is a private cluster (tests/reliability/servers.py), crashed with `pg_ctl stop -m
immediate` and recovered from its WAL on start."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.deploy import SUBJECTS, check_acknowledged, make_keys, seed_small_model
from tests.reliability.load import URL, Intake
from tests.reliability.servers import PrivatePostgres
from tests.worker.services import Services

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

CRASHES = 3
PROMPT = 10.0  # seconds: an answer slower than this while the database is down is a hang


def test_the_api_answers_503_while_postgresql_is_down_and_loses_nothing(
        private_postgres: PrivatePostgres, tmp_path: Path) -> None:
    url = private_postgres.url
    services = Services({"LETHE_DATABASE_URL": url, "LETHE_BROKER_URL": "memory://",
                         "LETHE_DATA_DIR": str(tmp_path / "data"),
                         "LETHE_SECRET_KEY": "restart-secret", "LETHE_ACCESS_LOG": "false"},
                        tmp_path)
    try:
        services.start_api()  # migrates the empty database
        headers = make_keys(url)
        with httpx.Client(base_url=services.base_url, timeout=60) as api:
            seed_small_model(api, headers["operator"])
            intake = Intake(services.base_url, headers["requester"], SUBJECTS, threads=8,
                            limit=1000).start()
            try:
                for crash in range(CRASHES):
                    intake.wait_for(acknowledged=len(intake.acknowledged) + 30, timeout=180)
                    known = next(iter(intake.acknowledged.values()))
                    private_postgres.stop("immediate")  # a crash: no goodbye to the clients
                    if crash == 0:
                        down = answers_while_down(api, headers, known)
                    time.sleep(0.5)
                    private_postgres.start()
                intake.wait_for(acknowledged=len(intake.acknowledged) + 40, timeout=180)
                after = api.get(f"{URL}/{known}", headers=headers["requester"])
                assert after.status_code == 200, after.text
                assert api.get("/readyz").status_code == 200
            finally:
                intake.stop()
            intake.resend_unanswered()
    finally:
        services.stop_all()

    for what, (status, content_type, seconds) in down.items():
        assert status == 503 and content_type == "application/problem+json", (what, status)
        assert seconds < PROMPT, (what, seconds)
    # The load saw only 503s while the database was down, no other failure.
    assert set(intake.statuses) <= {503}, intake.statuses
    assert intake.statuses.get(503), "the load never met the outage"
    stored = check_acknowledged(url, intake.acknowledged)
    assert stored == len(intake.acknowledged) == intake.issued
    print(f"\n{intake.issued} requests through {CRASHES} crashes; {intake.statuses.get(503)} "
          f"answers were 503 and sent again ({len(intake.replayed)} of them had committed: "
          f"replayed), {len(intake.interrupted)} lost their answer; probes while down: {down}")


def answers_while_down(api: httpx.Client, headers: dict[str, dict[str, str]], known: str
                       ) -> dict[str, tuple[int, str, float]]:
    """Status, content type and seconds of an answer per kind of call, the database down."""
    requester, operator = headers["requester"], headers["operator"]
    calls = {
        "intake": lambda: api.post(URL, json={"kind": "subject", "subject_ref": "customer-1"},
                                   headers={**requester, "Idempotency-Key": "while-down"}),
        "read": lambda: api.get(f"{URL}/{known}", headers=requester),
        "list": lambda: api.get(URL, headers=operator),
        "datasets": lambda: api.get("/v1/datasets", headers=operator),
        "audit": lambda: api.get("/v1/audit/verify", headers=headers["auditor"]),
        "readiness": lambda: api.get("/readyz"),
    }
    answers = {}
    for what, call in calls.items():
        started = time.monotonic()
        response = call()
        answers[what] = (response.status_code,
                         response.headers.get("content-type", "").split(";")[0],
                         round(time.monotonic() - started, 2))
        if what == "intake":  # the client learns how to retry safely
            assert "Idempotency-Key" in response.json()["detail"], response.text
            assert response.headers["Retry-After"]
    return answers
