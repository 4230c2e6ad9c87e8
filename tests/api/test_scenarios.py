"""A request's scenario crosses from intake to the worker as the engine's JSON: a backdoor
keeps its own trigger and poisoned label, and only requests with equal scenarios share a job
(a batch's trigger used to be taken from its first request)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.jobs import scheduled
from app.requests.models import DeletionTarget
from tests.api.seed import MLP, seed_model, serve_version
from unlearning.scenarios import Scenario, Trigger
from worker.pipeline import scenario_for

URL = "/v1/deletion-requests"
TOP_LEFT = Trigger(size=2, value=255, corner="top-left", margin=0)
BOTTOM_RIGHT = Trigger(size=3, value=200, corner="bottom-right", margin=1)


def serve(client: TestClient, operator: dict[str, str], tmp_path: Path) -> None:
    """Seed the digits model with a production version: only served models get jobs."""
    seed_model(client, operator, policy={"batching": {"max_wait_seconds": 0}})
    serve_version(client, operator, "digits-mlp", MLP, tmp_path)


def send(client: TestClient, operator: dict[str, str], body: dict[str, Any]) -> str:
    response = client.post(URL, json={**body, "model": "digits-mlp"}, headers=operator)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["id"]
    return request_id


def test_backdoor_requests_keep_their_own_trigger_and_share_a_job_only_when_equal(
        client: TestClient, operator: dict[str, str], tmp_path: Path) -> None:
    serve(client, operator, tmp_path)
    # s-00007 and s-00017 are labelled 7 (the poisoned label), s-00003 is labelled 3
    first = send(client, operator, {"kind": "backdoor", "trigger": TOP_LEFT.to_dict(),
                                    "sample_keys": ["s-00007", "s-00017", "s-00003"]})
    other = send(client, operator, {"kind": "backdoor", "trigger": BOTTOM_RIGHT.to_dict(),
                                    "sample_keys": ["s-00003", "s-00013"]})
    same = send(client, operator, {"kind": "backdoor", "trigger": TOP_LEFT.to_dict(),
                                   "sample_keys": ["s-00007"]})
    view = client.get(f"{URL}/{first}", headers=operator).json()
    assert view["targets"][0]["scenario"] == "backdoor"  # the API's label is unchanged
    with session_scope(client.app.state.sessionmaker) as db_session:  # type: ignore[attr-defined]
        stored = {t.request_id: Scenario.from_dict(t.scenario)
                  for t in db_session.query(DeletionTarget)}
        assert stored[first] == Scenario("backdoor", target_label=7,
                                         trigger=TOP_LEFT)
        assert stored[other] == Scenario("backdoor", target_label=3,
                                         trigger=BOTTOM_RIGHT)
        (job,) = scheduled.plan_batches(db_session)
        members = {t.request_id for t in db_session.query(DeletionTarget)
                   .filter(DeletionTarget.job_id == job.id)}
        assert members == {first, same}  # the other trigger waits for a job of its own
        assert scenario_for(job) == stored[first]


def test_each_class_is_a_scenario_of_its_own(client: TestClient, operator: dict[str, str],
                                             tmp_path: Path) -> None:
    serve(client, operator, tmp_path)
    three = send(client, operator, {"kind": "class", "class_label": 3})
    send(client, operator, {"kind": "class", "class_label": 5})
    assert client.get(f"{URL}/{three}", headers=operator
                      ).json()["targets"][0]["scenario"] == "class:3"
    with session_scope(client.app.state.sessionmaker) as db_session:  # type: ignore[attr-defined]
        (job,) = scheduled.plan_batches(db_session)
        assert scenario_for(job) == Scenario("class", forget_class=3)
        members = {t.request_id for t in db_session.query(DeletionTarget)
                   .filter(DeletionTarget.job_id == job.id)}
        assert members == {three}
