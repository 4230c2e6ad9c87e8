"""SIGKILL the API under load: every request that got a 2xx exists afterwards.

A real uvicorn process on PostgreSQL takes a bounded intake load from client threads, each
request with its own Idempotency-Key; the process group is SIGKILLed mid-load and started
again. Every acknowledged request must be in the database under its key with its intake's
audit events, the hash chain must verify, and the requests that were cut off get, when sent
again with the same key, either their original (committed before the crash: replayed) or a
new one, never two."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.deploy import SUBJECTS, check_acknowledged, make_keys, seed_small_model
from tests.reliability.load import Intake
from tests.worker.services import Services

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.slow]


def test_every_acknowledged_request_survives_a_sigkilled_api(
        postgres_url: str, tmp_path: Path) -> None:
    services = Services({"LETHE_DATABASE_URL": postgres_url, "LETHE_BROKER_URL": "memory://",
                         "LETHE_DATA_DIR": str(tmp_path / "data"),
                         "LETHE_SECRET_KEY": "crash-secret", "LETHE_ACCESS_LOG": "false"},
                        tmp_path)
    try:
        services.start_api()
        headers = make_keys(postgres_url)
        with httpx.Client(base_url=services.base_url, timeout=60) as api:
            seed_small_model(api, headers["operator"])
        intake = Intake(services.base_url, headers["requester"], SUBJECTS, threads=6,
                        limit=500).start()
        try:
            intake.wait_for(acknowledged=80, timeout=180)
            services.kill("api")  # SIGKILL, mid-load: requests in flight get no answer
            killed_at = len(intake.acknowledged)
            time.sleep(1.0)  # the clients keep retrying into the void
            services.start_api()
            intake.wait_for(acknowledged=killed_at + 80, timeout=180)
        finally:
            intake.stop()
        intake.resend_unanswered()
    finally:
        services.stop_all()

    cut_off = intake.interrupted
    assert cut_off, "the kill landed between requests; nothing was cut off"
    assert set(intake.acknowledged) >= cut_off
    stored = check_acknowledged(postgres_url, intake.acknowledged)
    # Nothing but what the clients sent, each key once: no duplicate from the resends.
    assert stored == len(intake.acknowledged) == intake.issued
    assert not {s for s in intake.statuses if s >= 500 and s != 503}, intake.statuses
    print(f"\n{intake.issued} requests, killed after {killed_at} acknowledgements, "
          f"{len(cut_off)} cut off and sent again ({len(intake.replayed)} of them replays of "
          f"requests committed before the crash); other answers: {intake.statuses}")
